import { levelOf, statusText } from '../src/statusline';
import { GIB, lease, pool } from './fixtures';

describe('the status bar line', () => {
  test('a held slice: device share, memory used of the cap, countdown', () => {
    const held = lease({ memory_used_bytes: 3.1 * GIB, idle_release_in: 42, auto_mode: true });
    const status = statusText('k1', pool(), [held], '');
    expect(status.text).toBe('GPU 0.5×A100 · 3.1/40 GiB · idle 42s');
    expect(status.kind).toBe('idle');
    expect(status.level).toBe('ok');
    expect(status.title).toContain('NVIDIA A100-SXM4-80GB');
  });

  test('the countdown keeps running between polls', () => {
    const held = lease({ idle_release_in: 42 });
    expect(statusText('k1', pool(), [held], '', 12.5).text).toBe(
      'GPU 0.5×A100 · cap 40 GiB · idle 30s'
    );
    expect(statusText('k1', pool(), [held], '', 100).text).toBe(
      'GPU 0.5×A100 · cap 40 GiB · idle 0s'
    );
  });

  test('colour near the cap and near zero', () => {
    expect(statusText('k1', pool(), [lease({ memory_used_bytes: 33 * GIB })], '').level).toBe(
      'warn'
    );
    expect(statusText('k1', pool(), [lease({ memory_used_bytes: 39 * GIB })], '').level).toBe(
      'critical'
    );
    expect(statusText('k1', pool(), [lease({ idle_release_in: 25 })], '').level).toBe('warn');
    expect(statusText('k1', pool(), [lease({ idle_release_in: 5 })], '').level).toBe('critical');
    expect(levelOf(null, null)).toBe('ok');
  });

  test('queued: place and ETA only when it is known', () => {
    const queue = [{ user: 'alice', kernel_id: 'k1', position: 2, estimated_wait_seconds: 50 }];
    const status = statusText('k1', pool({ queue, queue_length: 3 }), [], '');
    expect(status.text).toBe('GPU queued #2 · ~50 s');
    expect(status.kind).toBe('queued');
    const unknown = [{ ...queue[0], estimated_wait_seconds: -1 }];
    expect(statusText('k1', pool({ queue: unknown }), [], '').text).toBe('GPU queued #2');
  });

  test('nothing held: the pool', () => {
    expect(statusText('k1', pool(), [lease({ kernel_id: 'other' })], '').text).toBe('GPU 1/2 free');
    expect(statusText(null, pool({ devices_free: 0 }), [], '').kind).toBe('busy');
    const off = pool({ broker: { address: '', embedded: true, state: 'stopped', error: '' } });
    expect(statusText('k1', off, [], '').text).toBe('GPU –');
    expect(statusText('k1', null, [], 'refused').kind).toBe('error');
  });

  test('an ended lease is not held', () => {
    expect(statusText('k1', pool(), [lease({ state: 'released' })], '').text).toBe('GPU 1/2 free');
  });
});
