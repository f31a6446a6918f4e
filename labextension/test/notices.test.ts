import { endNotice, NoticeTracker } from '../src/notices';
import { lease } from './fixtures';

const queued = [{ user: 'alice', kernel_id: 'k1', position: 1, estimated_wait_seconds: -1 }];

describe('notifications, each once', () => {
  test('a grant after a wait', () => {
    const tracker = new NoticeTracker(0);
    expect(tracker.update('alice', [], [], queued)).toEqual([]);
    const granted = tracker.update('alice', [lease()], [], []);
    expect(granted).toHaveLength(1);
    expect(granted[0].type).toBe('success');
    expect(granted[0].message).toBe('GPU granted after the wait: 0.5×A100 (train.ipynb).');
    expect(tracker.update('alice', [lease()], [], [])).toEqual([]);
  });

  test('no grant notice without a wait', () => {
    const tracker = new NoticeTracker(0);
    expect(tracker.update('alice', [lease()], [], [])).toEqual([]);
  });

  test('an idle release, with Attach again, once', () => {
    const tracker = new NoticeTracker(100);
    const ended = lease({ state: 'released', end_reason: 'idle for 5.0 s', ended_at: 150 });
    const first = tracker.update('alice', [], [ended], []);
    expect(first).toHaveLength(1);
    expect(first[0].message).toBe(
      'GPU released after 5.0 s idle (train.ipynb): names are back in the kernel.'
    );
    expect(first[0].attachAgain).toBe(true);
    expect(tracker.update('alice', [], [ended], [])).toEqual([]);
  });

  test("old ends and the user's own releases are no news", () => {
    const tracker = new NoticeTracker(100);
    const old = lease({ state: 'revoked', end_reason: 'revoked by root', ended_at: 50 });
    const own = lease({
      lease_id: 'x2',
      state: 'released',
      end_reason: 'released by the kernel',
      ended_at: 150
    });
    expect(tracker.update('alice', [], [old, own], [])).toEqual([]);
  });

  test('revoke, preemption, expiry and loss', () => {
    const revoked = endNotice(
      lease({ state: 'revoked', end_reason: 'revoked by root: course over' })
    );
    expect(revoked?.type).toBe('error');
    expect(revoked?.message).toBe('GPU revoked by root: course over (train.ipynb).');
    const preempted = endNotice(
      lease({ state: 'preempted', end_reason: 'preempted: for a high-priority request' })
    );
    expect(preempted?.message).toBe('GPU preempted (train.ipynb): for a high-priority request.');
    expect(endNotice(lease({ state: 'expired', end_reason: 'no heartbeat' }))?.type).toBe(
      'warning'
    );
    const lost = endNotice(lease({ state: 'failed', end_reason: 'the worker died' }));
    expect(lost?.type).toBe('error');
    expect(lost?.message).toContain('GPU lost (train.ipynb): the worker died.');
  });

  test('a preemption under way is said once', () => {
    const tracker = new NoticeTracker(0);
    const preempting = lease({ state: 'preempting' });
    expect(tracker.update('alice', [preempting], [], [])).toHaveLength(1);
    expect(tracker.update('alice', [preempting], [], [])).toHaveLength(0);
  });
});
