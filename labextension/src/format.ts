/** Pure formatting: what the status bar and the panel say about a state. */
import { ILease, IPool } from './api';

/**
 * A duration as the kernel side writes it (Python's
 * `gpuattach_broker.units.format_duration`), so the widget, `%gpu status`,
 * the panel and the status bar agree: "0 ms", "9.1 s", "2.5 min", "3.0 h".
 * tests/fixtures/durations.json holds the cases both must give alike
 * (tests/unit/test_units.py checks this function against them).
 */
export function formatDuration(seconds: number): string {
  if (seconds < 1) {
    return `${pyFixed(seconds * 1000, 0)} ms`;
  }
  if (seconds < 120) {
    return `${pyFixed(seconds, 1)} s`;
  }
  if (seconds < 7200) {
    return `${pyFixed(seconds / 60, 1)} min`;
  }
  return `${pyFixed(seconds / 3600, 1)} h`;
}

/**
 * Python's `format(x, ".<digits>f")`: the exact value of the double rounded
 * half to even. `toFixed` rounds exact ties up instead ((2.5).toFixed(0) is
 * "3" where Python writes "2"), so a tie takes the even neighbour.
 */
export function pyFixed(x: number, digits: number): string {
  if (Number.isNaN(x)) {
    return 'nan';
  }
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  const abs = Math.abs(x);
  if (abs === Infinity) {
    return `${sign}inf`;
  }
  if (abs >= 1e21) {
    // toFixed switches to exponent notation here; such a double is an integer.
    return `${sign}${BigInt(abs).toString()}${digits > 0 ? '.' + '0'.repeat(digits) : ''}`;
  }
  const rounded = abs.toFixed(digits);
  // Exact decimal digits (toFixed is exact; 100 digits tell a tie from a
  // near-tie for any value that can round to a tie here).
  const exact = abs.toFixed(100);
  const point = exact.indexOf('.');
  const rest = exact.slice(point + 1 + digits);
  if (/^50*$/.test(rest)) {
    const down = exact.slice(0, digits > 0 ? point + 1 + digits : point);
    if (Number(down[down.length - 1]) % 2 === 0) {
      return sign + down;
    }
  }
  return sign + rounded;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value >= 10 || unit === 0 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

export type StatusKind = 'attached' | 'idle' | 'queued' | 'free' | 'busy' | 'off' | 'error';

export interface IStatusText {
  kind: StatusKind;
  text: string;
  title: string;
}

/**
 * The status bar text for one kernel: its lease if it holds one, its queue
 * place if it waits, else how much of the pool is free.
 * `elapsed` is the seconds since the data was fetched (countdowns keep running).
 */
export function statusText(
  kernelId: string | null,
  pool: IPool | null,
  leases: ILease[],
  error: string,
  elapsed = 0
): IStatusText {
  if (error && !pool) {
    return { kind: 'error', text: 'GPU ?', title: `GPU broker: ${error}` };
  }
  const lease = kernelId
    ? leases.find(l => l.kernel_id === kernelId && isLive(l.state))
    : undefined;
  if (lease) {
    let text = `GPU ● attached ${lease.slice_label}`;
    let kind: StatusKind = 'attached';
    if (lease.idle_release_in !== null) {
      text += ` · idle ${formatDuration(Math.max(0, lease.idle_release_in - elapsed))}`;
      kind = 'idle';
    }
    return {
      kind,
      text,
      title: `This kernel holds ${lease.slice_label} on ${lease.host} (lease ${lease.lease_id.slice(0, 8)}); click for the GPU panel`
    };
  }
  const queued = kernelId && pool ? pool.queue.find(q => q.kernel_id === kernelId) : undefined;
  if (queued) {
    const wait =
      queued.estimated_wait_seconds >= 0
        ? `, about ${formatDuration(queued.estimated_wait_seconds)}`
        : '';
    return {
      kind: 'queued',
      text: `GPU queued #${queued.position}`,
      title: `This kernel waits for a GPU slice${wait}; click for the GPU panel`
    };
  }
  if (!pool || pool.broker.state !== 'running') {
    return {
      kind: 'off',
      text: 'GPU –',
      title: pool?.broker.error || 'No GPU broker is running; the first %gpu attach starts one'
    };
  }
  return {
    kind: pool.devices_free > 0 ? 'free' : 'busy',
    text: `GPU ${pool.devices_free}/${pool.devices_total} free`,
    title: `${pool.devices_free} of ${pool.devices_total} devices free, ${pool.queue_length} waiting; click for the GPU panel`
  };
}

export function isLive(state: string): boolean {
  return state === 'active' || state === 'starting' || state === 'preempting';
}
