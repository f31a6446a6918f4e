/**
 * Attach, release and auto mode from the UI, for the active notebook's
 * kernel. Attach and auto run `%gpu ...` in that kernel (the namespace moves
 * with the slice, as when the user types it); release goes through the
 * server's REST API, which acts at once even while a cell runs.
 */

export const CommandIDs = {
  attach: 'gpuattach:attach',
  release: 'gpuattach:release',
  autoOn: 'gpuattach:auto-on',
  autoOff: 'gpuattach:auto-off',
  open: 'gpuattach:open-panel'
} as const;

export interface IGPUSettings {
  /** `0.5` (a share of a device), `4GiB` (memory), or `''` (a whole device). */
  defaultSlice: string;
  /** Seconds without a GPU cell before auto mode gives the slice back. */
  idleTimeout: number;
}

export const DEFAULT_SETTINGS: IGPUSettings = { defaultSlice: '', idleTimeout: 60 };

const FRACTION = /^(0?\.\d+|1(\.0*)?)$/;
const SIZE = /^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|k|m|g|t)$/i;

/** The slice options of a `%gpu` line; throws with a clear message on a bad setting. */
export function sliceArgs(slice: string): string {
  const value = slice.trim();
  if (!value) {
    return '';
  }
  if (FRACTION.test(value) && Number(value) > 0) {
    return ` --fraction ${Number(value)}`;
  }
  if (SIZE.test(value)) {
    return ` --mem ${value.replace(/\s+/g, '')}`;
  }
  throw new Error(
    `GPU setting defaultSlice ${JSON.stringify(slice)}: give a share of a device (0.5), a memory size (4GiB) or nothing for a whole device`
  );
}

/** The code a command runs in the kernel (the extension is loaded first). */
export function kernelCode(
  action: 'attach' | 'auto-on' | 'auto-off',
  settings: IGPUSettings
): string {
  const load = '%load_ext jupyter_gpuattach\n';
  switch (action) {
    case 'attach':
      return `${load}%gpu attach${sliceArgs(settings.defaultSlice)}`;
    case 'auto-on':
      return `${load}%gpu auto --idle ${Math.max(0, Math.round(settings.idleTimeout))}s${sliceArgs(settings.defaultSlice)}`;
    case 'auto-off':
      return `${load}%gpu auto off`;
  }
}

/** The settings as read from the registry, checked, with defaults for what is missing. */
export function readSettings(
  composite: Partial<Record<keyof IGPUSettings, unknown>>
): IGPUSettings {
  const slice = typeof composite.defaultSlice === 'string' ? composite.defaultSlice : '';
  const idle =
    typeof composite.idleTimeout === 'number' && composite.idleTimeout >= 0
      ? composite.idleTimeout
      : DEFAULT_SETTINGS.idleTimeout;
  return { defaultSlice: slice, idleTimeout: idle };
}
