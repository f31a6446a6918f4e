import { series, sparkPoints } from '../src/sparkline';

describe('sparkline', () => {
  test('points span the box, 0 at the bottom and 1 at the top', () => {
    expect(sparkPoints([], 120, 24)).toBe('');
    expect(sparkPoints([0, 1], 120, 24)).toBe('0.0,24.0 120.0,0.0');
    expect(sparkPoints([0.5, 2, -1], 100, 10)).toBe('0.0,5.0 50.0,0.0 100.0,10.0');
  });

  test('memory as a share of the cap', () => {
    const history = [
      { t: 0, busy: 0.25, memory_used: 1 },
      { t: 3, busy: 1, memory_used: 2 }
    ];
    expect(series(history, 4)).toEqual({ busy: [0.25, 1], memory: [0.25, 0.5] });
    expect(series(history, 0).memory).toEqual([0, 0]);
  });
});
