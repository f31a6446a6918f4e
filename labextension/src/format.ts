/**
 * Pure formatting, one function per kind of figure, written exactly as the
 * kernel side writes it (jupyter_gpuattach/figures.py): the status bar, the
 * panel, the widget and `%gpu status` agree. tests/fixtures/figures.json
 * holds the cases both sides check. No runtime imports: a Python test
 * transpiles this file alone and runs it.
 */

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

const GIB = 1024 ** 3;
const MIB = 1024 ** 2;

/** A held or busy time: `0.4 s`, `9.1 s`, `2.5 min`; under a second still in seconds. */
export function durationText(seconds: number): string {
  const s = Math.max(0, seconds);
  if (s < 1) {
    return `${pyFixed(s, 1)} s`;
  }
  return formatDuration(s);
}

export function heldText(held: number): string {
  return `held ${durationText(held)}`;
}

/** Busy as a share of held: `23 %` (`''` while nothing is held). */
export function shareText(busy: number, held: number): string {
  if (held <= 0) {
    return '';
  }
  return `${pyFixed((100 * Math.min(busy, held)) / held, 0)} %`;
}

/** `busy 3.2 s (23 %)`; without `held`, `busy 3.2 s`. */
export function busyText(busy: number, held: number | null = null): string {
  const text = `busy ${durationText(busy)}`;
  const share = held === null ? '' : shareText(busy, held);
  return share ? `${text} (${share})` : text;
}

export function heldBusyText(held: number, busy: number): string {
  return `${heldText(held)}, ${busyText(busy, held)}`;
}

function unitOf(cap: number): [number, string] {
  return cap >= GIB ? [GIB, 'GiB'] : [MIB, 'MiB'];
}

/** Memory used of the cap, in the cap's unit: `3.1/40 GiB`; `cap 40 GiB` when unknown. */
export function memoryText(used: number | null, cap: number): string {
  if (cap <= 0) {
    if (used === null) {
      return '';
    }
    const [factor, unit] = unitOf(used);
    return `${pyFixed(used / factor, 1)} ${unit}`;
  }
  const [factor, unit] = unitOf(cap);
  let total = pyFixed(cap / factor, 1);
  if (total.endsWith('.0')) {
    total = total.slice(0, -2);
  }
  if (used === null) {
    return `cap ${total} ${unit}`;
  }
  return `${pyFixed(used / factor, 1)}/${total} ${unit}`;
}

/** Used over cap, for the colour near the cap; null when unknown. */
export function memoryShare(used: number | null, cap: number): number | null {
  if (used === null || cap <= 0) {
    return null;
  }
  return used / cap;
}

/** Time left before an idle release: `idle 42s`, `idle 4m 05s`, `idle 1h 02m`. */
export function countdownText(seconds: number): string {
  const left = Math.max(0, Math.ceil(seconds - 1e-9));
  const pad = (n: number) => String(n).padStart(2, '0');
  if (left < 120) {
    return `idle ${left}s`;
  }
  if (left < 3600) {
    return `idle ${Math.floor(left / 60)}m ${pad(left % 60)}s`;
  }
  return `idle ${Math.floor(left / 3600)}h ${pad(Math.floor((left % 3600) / 60))}m`;
}

/** An estimated wait: `~20 s`, `~1 min`, `~2 h`; `''` when unknown (negative). */
export function etaText(seconds: number): string {
  if (seconds < 0) {
    return '';
  }
  if (seconds < 60) {
    return seconds < 55 ? `~${Math.max(5, 5 * Math.ceil(seconds / 5))} s` : '~1 min';
  }
  if (seconds < 3600) {
    return `~${Math.ceil(seconds / 60)} min`;
  }
  return `~${Math.ceil(seconds / 3600)} h`;
}

/** `queued #2 of 3 · ~1 min`; the ETA only when it is known. */
export function queueText(position: number, length: number, eta: number): string {
  const text = `queued #${position}` + (length > position ? ` of ${length}` : '');
  const wait = etaText(eta);
  return wait ? `${text} · ${wait}` : text;
}
