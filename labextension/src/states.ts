/**
 * The states of a lease, as the broker writes them (lower case; the proto's
 * `LeaseState` enum). One list for the whole extension: what counts as
 * live, what is an end someone chose, what is a loss.
 */
export type LeaseState =
  | 'active'
  | 'starting'
  | 'preempting'
  | 'released'
  | 'revoked'
  | 'preempted'
  | 'expired'
  | 'failed'
  | 'queued';

export const LEASE_STATES: readonly LeaseState[] = [
  'active',
  'starting',
  'preempting',
  'released',
  'revoked',
  'preempted',
  'expired',
  'failed',
  'queued'
];

/** A slice is held: the worker runs (or starts, or moves out for a preemption). */
export const LIVE_STATES: readonly LeaseState[] = ['active', 'starting', 'preempting'];

/** The lease is over. */
export const ENDED_STATES: readonly LeaseState[] = [
  'released',
  'revoked',
  'preempted',
  'expired',
  'failed'
];

export function isLive(state: string): boolean {
  return (LIVE_STATES as readonly string[]).includes(state);
}

export function isEnded(state: string): boolean {
  return (ENDED_STATES as readonly string[]).includes(state);
}

export function isLeaseState(state: string): state is LeaseState {
  return (LEASE_STATES as readonly string[]).includes(state);
}
