/**
 * The GPU side panel: the pool (hosts, devices, slices, queue) and the
 * user's leases with release buttons and an idle-timeout control; an admin
 * also sees every user's leases.
 *
 * Rows are kept by key and updated in place, so the one-second refresh does
 * not take the focus out of an input the user is typing in.
 */
import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { IDevice, ILease } from './api';
import { CommandIDs } from './commands';
import { busyText, countdownText, durationText, formatSize, heldText, memoryText } from './format';
import { GPUModel } from './model';
import { renderSparkline } from './sparkline';
import { idleNote } from './statusline';
import { isLive } from './states';

/** The panel's buttons: the palette's commands, named briefly. */
const SHORT_LABELS: Record<string, string> = {
  [CommandIDs.attach]: 'Attach',
  [CommandIDs.release]: 'Release',
  [CommandIDs.autoOn]: 'Auto on',
  [CommandIDs.autoOff]: 'Auto off'
};

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

/** Keeps one DOM row per key; rows whose key went away are removed. */
class KeyedList<T> {
  constructor(
    readonly node: HTMLElement,
    private _create: (item: T) => HTMLElement,
    private _update: (row: HTMLElement, item: T) => void
  ) {}

  render(items: T[], key: (item: T) => string): void {
    const seen = new Set<string>();
    let previous: HTMLElement | null = null;
    for (const item of items) {
      const k = key(item);
      seen.add(k);
      let row = this._rows.get(k);
      if (!row) {
        row = this._create(item);
        row.dataset.key = k;
        this._rows.set(k, row);
      }
      this._update(row, item);
      const expected: Element | null = previous
        ? previous.nextElementSibling
        : this.node.firstElementChild;
      if (expected !== row) {
        this.node.insertBefore(row, expected);
      }
      previous = row;
    }
    for (const [k, row] of this._rows) {
      if (!seen.has(k)) {
        row.remove();
        this._rows.delete(k);
      }
    }
  }

  private _rows = new Map<string, HTMLElement>();
}

export class GPUPanel extends Widget {
  constructor(model: GPUModel, commands: CommandRegistry | null = null) {
    super();
    this._model = model;
    this._commands = commands;
    this.id = 'jp-gpuattach-panel';
    this.addClass('jp-gpuattach-Panel');
    this.title.caption = 'GPU pool and leases';

    const header = el('div', 'jp-gpuattach-header');
    header.appendChild(el('h2', '', 'GPU'));
    this._summary = el('div', 'jp-gpuattach-summary');
    header.appendChild(this._summary);
    this.node.appendChild(header);
    this._message = el('div', 'jp-gpuattach-message');
    this._message.setAttribute('role', 'status');
    this.node.appendChild(this._message);

    if (commands) {
      // The same commands as the palette, for the active notebook's kernel.
      this.node.appendChild(el('h3', '', 'This notebook'));
      const bar = el('div', 'jp-gpuattach-actions');
      for (const id of [
        CommandIDs.attach,
        CommandIDs.release,
        CommandIDs.autoOn,
        CommandIDs.autoOff
      ]) {
        const button = el('button', 'jp-mod-styled jp-gpuattach-action');
        button.dataset.command = id;
        button.addEventListener('click', () => {
          void commands.execute(id);
        });
        bar.appendChild(button);
        this._actions.push(button);
      }
      this.node.appendChild(bar);
    }

    this.node.appendChild(el('h3', '', 'Your leases'));
    this._noLeases = el('div', 'jp-gpuattach-empty', 'No GPU held by your kernels.');
    this.node.appendChild(this._noLeases);
    const mine = el('div', 'jp-gpuattach-leases');
    this.node.appendChild(mine);
    this._mine = new KeyedList<ILease>(
      mine,
      lease => this._createLease(lease),
      (row, lease) => this._updateLease(row, lease)
    );

    this.node.appendChild(el('h3', '', 'Pool'));
    const pool = el('div', 'jp-gpuattach-devices');
    this.node.appendChild(pool);
    this._devices = new KeyedList<IDevice>(
      pool,
      device => this._createDevice(device),
      (row, device) => this._updateDevice(row, device)
    );
    this._queue = el('div', 'jp-gpuattach-queue');
    this.node.appendChild(this._queue);

    this._othersTitle = el('h3', '', 'All users');
    this.node.appendChild(this._othersTitle);
    const others = el('table', 'jp-gpuattach-others');
    this.node.appendChild(others);
    this._others = new KeyedList<ILease>(
      others,
      () => {
        const row = el('tr');
        for (let i = 0; i < 5; i++) {
          row.appendChild(el('td'));
        }
        return row;
      },
      (row, lease) => {
        const cells = row.children;
        setText(cells[0] as HTMLElement, lease.user);
        setText(cells[1] as HTMLElement, lease.slice_label);
        setText(cells[2] as HTMLElement, lease.host);
        setText(cells[3] as HTMLElement, lease.state);
        setText(cells[4] as HTMLElement, heldText(lease.held_seconds));
      }
    );
    model.changed.connect(this._render, this);
    this._render();
  }

  protected onAfterShow(): void {
    this._model.showAll = true;
    void this._model.refresh();
  }

  protected onAfterHide(): void {
    this._model.showAll = false;
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    if (!this.isVisible) {
      return;
    }
    const model = this._model;
    const pool = model.pool;
    const elapsed = model.elapsed;
    const commands = this._commands;
    if (commands) {
      for (const button of this._actions) {
        const id = button.dataset.command as string;
        setText(button, SHORT_LABELS[id] ?? commands.label(id));
        button.title = commands.caption(id);
        button.disabled = !commands.isEnabled(id);
      }
    }
    if (pool && pool.broker.state === 'running') {
      setText(
        this._summary,
        `${pool.devices_free}/${pool.devices_total} devices free · ` +
          `${formatSize(pool.memory_total_bytes - pool.memory_used_bytes)} of ` +
          `${formatSize(pool.memory_total_bytes)} free · ${pool.queue_length} waiting`
      );
    } else {
      setText(this._summary, pool?.broker.error || model.error || 'broker not running');
    }
    const mine = model.leases.filter(l => l.user === model.user && isLive(l.state));
    this._noLeases.hidden = mine.length > 0;
    this._mine.render(mine, l => l.lease_id);
    for (const row of Array.from(this._mine.node.children) as HTMLElement[]) {
      const lease = mine.find(l => l.lease_id === row.dataset.key);
      if (lease) {
        this._tickLease(row, lease, elapsed);
      }
    }
    const devices = pool ? pool.hosts.flatMap(h => h.devices) : [];
    this._devices.render(devices, d => d.device_id);
    const queue = pool?.queue ?? [];
    setText(
      this._queue,
      pool && pool.queue_length > 0
        ? `Queue: ${pool.queue_length} waiting` +
            (queue.length ? ` (${queue.map(q => `#${q.position} ${q.user}`).join(', ')})` : '')
        : 'Queue: empty'
    );
    const others = model.admin ? model.leases.filter(l => isLive(l.state)) : [];
    this._othersTitle.hidden = !model.admin;
    this._others.node.hidden = !model.admin;
    this._others.render(others, l => l.lease_id);
  }

  private _createLease(lease: ILease): HTMLElement {
    const row = el('div', 'jp-gpuattach-lease');
    row.dataset.leaseId = lease.lease_id;
    const title = el('div', 'jp-gpuattach-lease-title');
    row.appendChild(title);
    row.appendChild(el('div', 'jp-gpuattach-lease-detail'));
    row.appendChild(el('div', 'jp-gpuattach-lease-times'));
    row.appendChild(el('div', 'jp-gpuattach-spark'));
    const actions = el('div', 'jp-gpuattach-lease-actions');
    const release = el('button', 'jp-mod-styled jp-mod-warn jp-gpuattach-release', 'Release');
    release.title = 'Give the slice back now (a cell running on it is stopped)';
    release.addEventListener('click', () => {
      release.disabled = true;
      this._model
        .release(lease.lease_id)
        .then(() => this._say(`Released lease ${lease.lease_id.slice(0, 8)}.`))
        .catch(error => this._say(`Release failed: ${(error as Error).message}`))
        .finally(() => {
          release.disabled = false;
        });
    });
    actions.appendChild(release);
    const label = el('label', 'jp-gpuattach-idle');
    label.appendChild(document.createTextNode('release after '));
    const input = el('input', 'jp-mod-styled jp-gpuattach-idle-input');
    input.type = 'number';
    input.min = '0';
    input.step = '10';
    // The current timeout, as a value (not a placeholder that looks like one).
    input.value = lease.idle_seconds !== null ? String(Math.round(lease.idle_seconds)) : '';
    label.appendChild(input);
    label.appendChild(document.createTextNode(' s idle '));
    const set = el('button', 'jp-mod-styled jp-gpuattach-idle-set', 'Set');
    set.addEventListener('click', () => {
      const seconds = Number(input.value);
      if (!input.value || !Number.isFinite(seconds) || seconds < 0) {
        this._say('Idle timeout: give a number of seconds (0 or more).');
        return;
      }
      this._model
        .setIdle(lease.kernel_id, seconds)
        .then(() =>
          this._say(
            `Idle timeout of this kernel set to ${durationText(seconds)}` +
              (lease.auto_mode ? '.' : '; the kernel is now in auto mode.')
          )
        )
        .catch(error => this._say(`Idle timeout not set: ${(error as Error).message}`));
    });
    label.appendChild(set);
    actions.appendChild(label);
    row.appendChild(actions);
    row.appendChild(el('div', 'jp-gpuattach-idle-note'));
    return row;
  }

  private _updateLease(row: HTMLElement, lease: ILease): void {
    const [title, detail] = Array.from(row.children) as HTMLElement[];
    const name = lease.notebook || `kernel ${lease.kernel_id.slice(0, 8)}`;
    setText(title, `${name} · ${lease.state}`);
    const memory = memoryText(lease.memory_used_bytes ?? null, lease.memory_bytes);
    setText(
      detail,
      [
        `${lease.slice_label} on ${lease.host}`,
        memory ? `memory ${memory}` : '',
        `lease ${lease.lease_id.slice(0, 8)}`
      ]
        .filter(Boolean)
        .join(' · ')
    );
    row.dataset.state = lease.state;
    const spark = row.querySelector('.jp-gpuattach-spark') as HTMLElement;
    renderSparkline(spark, lease.history ?? [], lease.memory_bytes);
    const note = row.querySelector('.jp-gpuattach-idle-note') as HTMLElement;
    setText(note, idleNote(lease));
    const input = row.querySelector('.jp-gpuattach-idle-input') as HTMLInputElement;
    const shown = lease.idle_seconds !== null ? String(Math.round(lease.idle_seconds)) : '';
    if (document.activeElement !== input && input.dataset.shown !== shown) {
      input.value = shown; // follows the kernel's timeout unless the user is typing
      input.dataset.shown = shown;
    }
  }

  private _tickLease(row: HTMLElement, lease: ILease, elapsed: number): void {
    const times = row.children[2] as HTMLElement;
    const held = lease.held_seconds + elapsed;
    let text = `${heldText(held)}, ${busyText(lease.busy_seconds, held)}`;
    if (lease.idle_release_in !== null) {
      // A no-break space: the countdown never wraps inside ("idle" / "9s").
      text += ` · ${countdownText(lease.idle_release_in - elapsed).replace(' ', '\u00a0')}`;
    }
    setText(times, text);
  }

  private _createDevice(device: IDevice): HTMLElement {
    const row = el('div', 'jp-gpuattach-device');
    row.appendChild(el('div', 'jp-gpuattach-device-name'));
    const bar = el('div', 'jp-gpuattach-bar');
    bar.appendChild(el('div', 'jp-gpuattach-bar-fill'));
    row.appendChild(bar);
    row.appendChild(el('div', 'jp-gpuattach-device-detail'));
    return row;
  }

  private _updateDevice(row: HTMLElement, device: IDevice): void {
    const [name, bar, detail] = Array.from(row.children) as HTMLElement[];
    setText(name, `${device.host} · ${device.name || device.device_id} (${device.kind})`);
    const used = device.memory_bytes ? device.allocated_bytes / device.memory_bytes : 0;
    (bar.firstElementChild as HTMLElement).style.width = `${Math.round(100 * used)}%`;
    const flags = [
      device.online ? '' : 'offline',
      device.draining ? 'draining' : '',
      device.exclusive ? 'whole device leased' : ''
    ].filter(Boolean);
    setText(
      detail,
      `${formatSize(device.allocated_bytes)} of ${formatSize(device.memory_bytes)} used · ` +
        `${device.leases} slice${device.leases === 1 ? '' : 's'}` +
        (flags.length ? ` · ${flags.join(', ')}` : '')
    );
    row.dataset.free = String(device.allocated_bytes === 0);
  }

  private _say(text: string): void {
    setText(this._message, text);
  }

  private _model: GPUModel;
  private _commands: CommandRegistry | null;
  private _actions: HTMLButtonElement[] = [];
  private _summary: HTMLElement;
  private _message: HTMLElement;
  private _noLeases: HTMLElement;
  private _mine: KeyedList<ILease>;
  private _devices: KeyedList<IDevice>;
  private _queue: HTMLElement;
  private _othersTitle: HTMLElement;
  private _others: KeyedList<ILease>;
}
