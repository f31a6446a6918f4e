/** Pure formatting: what the status bar and the panel say about a state. */
import { ILease, IPool } from './api';

export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  }
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, '0')}m`;
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
      text += ` · idle ${formatDuration(lease.idle_release_in - elapsed)}`;
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
