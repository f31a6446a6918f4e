/**
 * What the status bar item and the side panel show, fetched by one poll.
 *
 * One poll for the whole page: it backs off when the server fails (so a
 * stopped server is not hammered) and goes to standby while the page is
 * hidden. A one-second tick keeps countdowns moving between polls without
 * asking the server.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { fetchLeases, fetchPool, ILease, IPool, releaseLease, setKernelIdle } from './api';
import { INotice, NoticeTracker } from './notices';

export const POLL_INTERVAL_MS = 3000;
export const POLL_MAX_MS = 60000;
/** How far back ended leases are asked for (their notifications). */
export const RECENT_SECONDS = 300;

export class GPUModel {
  constructor() {
    this._poll = new Poll({
      auto: true,
      factory: () => this._fetch(),
      frequency: { interval: POLL_INTERVAL_MS, backoff: true, max: POLL_MAX_MS },
      name: 'jupyter-gpuattach:poll',
      standby: 'when-hidden'
    });
    this._tick = window.setInterval(() => {
      if (!document.hidden) {
        this._changed.emit();
      }
    }, 1000);
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Lease changes worth a notification, each once. */
  get notices(): ISignal<this, INotice> {
    return this._notices;
  }

  /** Leases of the user that ended in the last minutes. */
  get ended(): ILease[] {
    return this._ended;
  }

  /** The live lease of a kernel, if it holds one. */
  leaseOf(kernelId: string | null): ILease | undefined {
    return kernelId
      ? this._leases.find(
          l => l.kernel_id === kernelId && ['active', 'starting', 'preempting'].includes(l.state)
        )
      : undefined;
  }

  get pool(): IPool | null {
    return this._pool;
  }

  /** The user's leases (every user's for an admin who asked for them). */
  get leases(): ILease[] {
    return this._leases;
  }

  get user(): string {
    return this._user;
  }

  get admin(): boolean {
    return this._admin;
  }

  get error(): string {
    return this._error;
  }

  /** Seconds since the data shown was fetched, for countdowns. */
  get elapsed(): number {
    return (Date.now() - this._fetchedAt) / 1000;
  }

  /** Admins can ask for every user's leases (the panel does while it is open). */
  set showAll(value: boolean) {
    if (this._showAll !== value) {
      this._showAll = value;
      void this.refresh();
    }
  }

  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  async release(leaseId: string, reason?: string): Promise<void> {
    await releaseLease(leaseId, reason);
    await this.refresh();
  }

  async setIdle(kernelId: string, seconds: number): Promise<void> {
    await setKernelIdle(kernelId, seconds);
    await this.refresh();
  }

  dispose(): void {
    this._poll.dispose();
    window.clearInterval(this._tick);
  }

  private async _fetch(): Promise<void> {
    try {
      const [pool, leases] = await Promise.all([
        fetchPool(),
        fetchLeases(this._showAll && this._admin, RECENT_SECONDS)
      ]);
      this._pool = pool;
      this._leases = leases.leases;
      this._ended = leases.ended ?? [];
      // Leases that ended before this page first looked are old news.
      this._tracker ??= new NoticeTracker(leases.now);
      this._user = leases.user;
      this._admin = leases.admin;
      this._error = pool.broker.error;
      this._fetchedAt = Date.now();
    } catch (error) {
      this._error = String((error as Error).message || error);
      this._changed.emit();
      throw error; // the poll backs off
    }
    this._changed.emit();
    const notices = this._tracker!.update(
      this._user,
      this._leases,
      this._ended,
      this._pool?.queue ?? []
    );
    for (const notice of notices) {
      this._notices.emit(notice);
    }
  }

  private _poll: Poll;
  private _tick: number;
  private _changed = new Signal<this, void>(this);
  private _pool: IPool | null = null;
  private _leases: ILease[] = [];
  private _ended: ILease[] = [];
  private _notices = new Signal<this, INotice>(this);
  private _tracker: NoticeTracker | null = null;
  private _user = '';
  private _admin = false;
  private _error = '';
  private _fetchedAt = Date.now();
  private _showAll = false;
}
