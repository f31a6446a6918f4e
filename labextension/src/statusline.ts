/**
 * The status bar line for the active notebook's kernel, in the idiom of
 * jupyter-resource-usage: `GPU 0.5×A100 · 3.1/40 GiB · idle 42s` while it
 * holds a slice, `GPU queued #2 · ~1 min` while it waits, the pool
 * (`GPU 1/2 free`) when it holds nothing. Pure: tested without a browser.
 */
import type { ILease, IPool } from './api';
import { countdownText, durationText, memoryShare, memoryText, queueText } from './format';
import { isLive } from './states';

export type StatusKind = 'attached' | 'idle' | 'queued' | 'free' | 'busy' | 'off' | 'error';

/** How urgent the line looks: memory near the cap, or the countdown near zero. */
export type StatusLevel = 'ok' | 'warn' | 'critical';

export interface IStatusText {
  kind: StatusKind;
  level: StatusLevel;
  text: string;
  title: string;
}

/** Memory share from which the line turns amber, and red. */
export const MEMORY_WARN = 0.8;
export const MEMORY_CRITICAL = 0.95;
/** Seconds left on the idle countdown from which the line turns amber, and red. */
export const IDLE_WARN = 30;
export const IDLE_CRITICAL = 10;

export function levelOf(memory: number | null, idleLeft: number | null): StatusLevel {
  if (
    (memory !== null && memory >= MEMORY_CRITICAL) ||
    (idleLeft !== null && idleLeft <= IDLE_CRITICAL)
  ) {
    return 'critical';
  }
  if ((memory !== null && memory >= MEMORY_WARN) || (idleLeft !== null && idleLeft <= IDLE_WARN)) {
    return 'warn';
  }
  return 'ok';
}

/**
 * `elapsed`: seconds since the data was fetched (the countdown keeps running
 * between polls).
 */
export function statusText(
  kernelId: string | null,
  pool: IPool | null,
  leases: ILease[],
  error: string,
  elapsed = 0
): IStatusText {
  if (error && !pool) {
    return { kind: 'error', level: 'ok', text: 'GPU ?', title: `GPU broker: ${error}` };
  }
  const lease = kernelId
    ? leases.find(l => l.kernel_id === kernelId && isLive(l.state))
    : undefined;
  if (lease) {
    const parts = [`GPU ${lease.slice_label}`];
    const memory = memoryText(lease.memory_used_bytes ?? null, lease.memory_bytes);
    if (memory) {
      parts.push(memory);
    }
    let idleLeft: number | null = null;
    if (lease.idle_release_in !== null && lease.idle_release_in !== undefined) {
      idleLeft = Math.max(0, lease.idle_release_in - elapsed);
      parts.push(countdownText(idleLeft));
    }
    if (lease.state === 'preempting') {
      parts.push('preempted, moving out');
    }
    const share = memoryShare(lease.memory_used_bytes ?? null, lease.memory_bytes);
    const device = lease.device_name || 'device';
    return {
      kind: idleLeft !== null ? 'idle' : 'attached',
      level: lease.state === 'preempting' ? 'critical' : levelOf(share, idleLeft),
      text: parts.join(' · '),
      title:
        `This kernel holds ${lease.slice_label} (${device}) on ${lease.host}, lease ` +
        `${lease.lease_id.slice(0, 8)}` +
        (idleLeft !== null
          ? `; released after ${countdownText(idleLeft).slice(5)} more idle`
          : '') +
        '; click for the GPU panel'
    };
  }
  const queued = kernelId && pool ? pool.queue.find(q => q.kernel_id === kernelId) : undefined;
  if (queued) {
    return {
      kind: 'queued',
      level: 'warn',
      text: `GPU ${queueText(queued.position, 0, queued.estimated_wait_seconds)}`,
      title: `This kernel waits for a GPU slice (${pool?.queue_length ?? 1} waiting); click for the GPU panel`
    };
  }
  if (!pool || pool.broker.state !== 'running') {
    return {
      kind: 'off',
      level: 'ok',
      text: 'GPU –',
      title: pool?.broker.error || 'No GPU broker is running; the first %gpu attach starts one'
    };
  }
  return {
    kind: pool.devices_free > 0 ? 'free' : 'busy',
    level: 'ok',
    text: `GPU ${pool.devices_free}/${pool.devices_total} free`,
    title: `${pool.devices_free} of ${pool.devices_total} devices free, ${pool.queue_length} waiting; click for the GPU panel`
  };
}

/** What Set does to a kernel's idle timeout, in words (shown next to the input). */
export function idleNote(lease: ILease): string {
  if (lease.auto_mode && lease.idle_seconds !== null) {
    return `Auto mode: released after ${durationText(lease.idle_seconds)} without a GPU cell.`;
  }
  if (lease.idle_seconds !== null) {
    return `The policy releases it after ${durationText(lease.idle_seconds)} idle. Set switches this kernel to auto mode.`;
  }
  return 'Manual mode: no idle timeout. Set switches this kernel to auto mode (released when idle, attached again by the next GPU cell).';
}
