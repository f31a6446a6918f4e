import { kernelCode, readSettings, sliceArgs } from '../src/commands';
import { idleNote } from '../src/statusline';
import { isEnded, isLive, LEASE_STATES } from '../src/states';
import { lease } from './fixtures';

describe('commands and settings', () => {
  test('the default slice becomes %gpu options', () => {
    expect(sliceArgs('')).toBe('');
    expect(sliceArgs('0.5')).toBe(' --fraction 0.5');
    expect(sliceArgs('4GiB')).toBe(' --mem 4GiB');
    expect(() => sliceArgs('half')).toThrow(/defaultSlice "half"/);
  });

  test('each command runs one %gpu line after loading the extension', () => {
    const settings = { defaultSlice: '0.25', idleTimeout: 90 };
    expect(kernelCode('attach', settings)).toBe(
      '%load_ext jupyter_gpuattach\n%gpu attach --fraction 0.25'
    );
    expect(kernelCode('auto-on', settings)).toBe(
      '%load_ext jupyter_gpuattach\n%gpu auto --idle 90s --fraction 0.25'
    );
    expect(kernelCode('auto-off', settings)).toBe('%load_ext jupyter_gpuattach\n%gpu auto off');
  });

  test('settings: defaults for what is missing or wrong', () => {
    expect(readSettings({})).toEqual({ defaultSlice: '', idleTimeout: 60 });
    expect(readSettings({ defaultSlice: '2GiB', idleTimeout: -4 })).toEqual({
      defaultSlice: '2GiB',
      idleTimeout: 60
    });
  });

  test('the panel says plainly what Set does', () => {
    expect(idleNote(lease({ auto_mode: true, idle_seconds: 60 }))).toBe(
      'Auto mode: released after 60.0 s without a GPU cell.'
    );
    expect(idleNote(lease())).toMatch(
      /^Manual mode: no idle timeout\. Set switches this kernel to auto mode/
    );
  });
});

describe('lease states', () => {
  test('one list: live, ended, queued', () => {
    expect(LEASE_STATES).toHaveLength(9);
    expect(LEASE_STATES.filter(isLive)).toEqual(['active', 'starting', 'preempting']);
    expect(LEASE_STATES.filter(isEnded)).toEqual([
      'released',
      'revoked',
      'preempted',
      'expired',
      'failed'
    ]);
    expect(isLive('queued') || isEnded('queued')).toBe(false);
  });
});
