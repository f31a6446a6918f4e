/**
 * The TypeScript figures give the same text as jupyter_gpuattach/figures.py
 * for every case of tests/fixtures/figures.json (tests/unit/test_figures.py
 * checks the Python side against the same file).
 */
import * as fs from 'fs';
import * as path from 'path';

import {
  busyText,
  countdownText,
  durationText,
  etaText,
  heldBusyText,
  memoryShare,
  memoryText,
  queueText
} from '../src/format';

type Row = Array<number | string | null>;
const cases: Record<string, Row[]> = JSON.parse(
  fs.readFileSync(path.join(__dirname, '..', '..', 'tests', 'fixtures', 'figures.json'), 'utf8')
);

describe('one format per figure, as the kernel writes it', () => {
  test.each(cases.duration)('duration %p -> %p', (seconds, text) => {
    expect(durationText(seconds as number)).toBe(text);
  });
  test.each(cases.busy)('busy %p of %p -> %p', (busy, held, text) => {
    expect(busyText(busy as number, held as number | null)).toBe(text);
  });
  test.each(cases.held_busy)('held %p busy %p -> %p', (held, busy, text) => {
    expect(heldBusyText(held as number, busy as number)).toBe(text);
  });
  test.each(cases.memory)('memory %p of %p -> %p', (used, cap, text) => {
    expect(memoryText(used as number | null, cap as number)).toBe(text);
  });
  test.each(cases.countdown)('countdown %p -> %p', (seconds, text) => {
    expect(countdownText(seconds as number)).toBe(text);
  });
  test.each(cases.eta)('eta %p -> %p', (seconds, text) => {
    expect(etaText(seconds as number)).toBe(text);
  });
  test.each(cases.queue)('queue #%p of %p eta %p -> %p', (position, length, eta, text) => {
    expect(queueText(position as number, length as number, eta as number)).toBe(text);
  });
  test('memory share is unknown without a sample or a cap', () => {
    expect(memoryShare(null, 10)).toBeNull();
    expect(memoryShare(5, 0)).toBeNull();
    expect(memoryShare(9, 10)).toBeCloseTo(0.9);
  });
});
