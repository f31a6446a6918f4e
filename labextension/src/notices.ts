/**
 * Which JupyterLab notifications the lease changes call for, each once:
 * a grant after a wait, an idle release, a revoke, a preemption (when it
 * starts and when it ends), a lease lost or expired. Pure: it compares what
 * one poll saw with the previous ones; index.ts shows what it returns.
 * A release the user chose (a cell, the panel, a command) is no news.
 */
import type { ILease, IQueued } from './api';
import { isLive } from './states';

export type NoticeType = 'success' | 'info' | 'warning' | 'error';

export interface INotice {
  /** Once per key: `<lease id>:<what>`. */
  key: string;
  type: NoticeType;
  message: string;
  kernelId: string;
  /** Offer "Attach again" (the slice is gone and the user may want it back). */
  attachAgain: boolean;
}

function where(lease: ILease): string {
  return lease.notebook ? ` (${lease.notebook})` : '';
}

/** What to say about a lease that ended; null when the user chose it. */
export function endNotice(lease: ILease): INotice | null {
  const reason = lease.end_reason || lease.state;
  const base = { key: `${lease.lease_id}:ended`, kernelId: lease.kernel_id, attachAgain: true };
  switch (lease.state) {
    case 'released':
      if (/^idle for /.test(reason)) {
        return {
          ...base,
          type: 'info',
          message: `GPU released after ${reason.slice('idle for '.length)} idle${where(lease)}: names are back in the kernel.`
        };
      }
      return null;
    case 'revoked':
      return {
        ...base,
        type: 'error',
        message: `GPU ${reason.startsWith('revoked') ? reason : `revoked: ${reason}`}${where(lease)}.`
      };
    case 'preempted':
      return {
        ...base,
        type: 'warning',
        message: `GPU preempted${where(lease)}: ${reason.replace(/^preempted:?\s*/, '') || 'for a higher-priority request'}.`
      };
    case 'expired':
      return { ...base, type: 'warning', message: `GPU lease ended${where(lease)}: ${reason}.` };
    case 'failed':
      return {
        ...base,
        type: 'error',
        message: `GPU lost${where(lease)}: ${reason}. Names are as of the last GPU cell that finished.`
      };
    default:
      return null;
  }
}

export class NoticeTracker {
  /** `since`: epoch seconds; leases that ended before it are old news. */
  constructor(since: number) {
    this._since = since;
  }

  /** The notices this poll calls for (none twice). */
  update(user: string, leases: ILease[], ended: ILease[], queue: IQueued[]): INotice[] {
    const out: INotice[] = [];
    const add = (notice: INotice | null) => {
      if (notice && !this._seen.has(notice.key)) {
        this._seen.add(notice.key);
        out.push(notice);
      }
    };
    for (const lease of leases) {
      if (lease.user !== user || !isLive(lease.state)) {
        continue;
      }
      if (this._waiting.has(lease.kernel_id)) {
        add({
          key: `${lease.lease_id}:granted`,
          type: 'success',
          message: `GPU granted after the wait: ${lease.slice_label}${where(lease)}.`,
          kernelId: lease.kernel_id,
          attachAgain: false
        });
      }
      if (lease.state === 'preempting') {
        add({
          key: `${lease.lease_id}:preempting`,
          type: 'warning',
          message: `GPU preempted${where(lease)}: a higher-priority request needs the slice; it goes back when the running cell ends.`,
          kernelId: lease.kernel_id,
          attachAgain: false
        });
      }
    }
    for (const lease of ended) {
      if (lease.user === user && (lease.ended_at ?? 0) >= this._since) {
        add(endNotice(lease));
      }
    }
    const held = new Set(leases.filter(l => isLive(l.state)).map(l => l.kernel_id));
    this._waiting = new Set(
      queue.filter(q => q.user === user && !held.has(q.kernel_id)).map(q => q.kernel_id)
    );
    return out;
  }

  private _since: number;
  private _seen = new Set<string>();
  private _waiting = new Set<string>();
}
