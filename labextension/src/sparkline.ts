/**
 * A small busy/memory sparkline per lease, from the samples the server keeps
 * (one per look at the broker's lease, whose figures come from heartbeats).
 */
import type { ISample } from './api';

/** SVG polyline points for `values` (0..1) in a `width`×`height` box. */
export function sparkPoints(values: number[], width: number, height: number): string {
  if (values.length === 0) {
    return '';
  }
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  return values
    .map((v, i) => {
      const y = height - Math.max(0, Math.min(1, v)) * height;
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}

/** Busy shares and memory used as shares of the cap, oldest first. */
export function series(history: ISample[], cap: number): { busy: number[]; memory: number[] } {
  return {
    busy: history.map(s => s.busy),
    memory: history.map(s => (cap > 0 ? s.memory_used / cap : 0))
  };
}

const SVG = 'http://www.w3.org/2000/svg';

/** An inline SVG with two lines: busy share (solid) and memory used of the cap (dashed). */
export function renderSparkline(node: HTMLElement, history: ISample[], cap: number): void {
  const width = 120;
  const height = 24;
  let svg = node.querySelector('svg');
  if (!svg) {
    svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', String(width));
    svg.setAttribute('height', String(height));
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    for (const name of ['busy', 'memory']) {
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('class', `jp-gpuattach-spark-${name}`);
      line.setAttribute('fill', 'none');
      svg.appendChild(line);
    }
    node.appendChild(svg);
  }
  const { busy, memory } = series(history, cap);
  const lines = svg.querySelectorAll('polyline');
  lines[0].setAttribute('points', sparkPoints(busy, width, height));
  lines[1].setAttribute('points', sparkPoints(memory, width, height));
  const last = history[history.length - 1];
  node.title = last
    ? `last ${Math.round((last.t - history[0].t) / 60)} min: busy (solid) and memory of the cap (dashed)`
    : 'no samples yet';
}
