/**
 * The server extension's REST API (`/gpuattach/api/`), typed.
 *
 * Requests go through `ServerConnection`, so the base URL, the XSRF cookie
 * and the token are handled the way JupyterLab handles them for its own
 * calls: the extension works under a non-default `base_url` and behind
 * JupyterHub without any configuration of its own.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface ISlice {
  memory_bytes: number;
  fraction: number;
  gpus: number;
}

export interface ILease {
  lease_id: string;
  user: string;
  kernel_id: string;
  notebook: string | null;
  state: string;
  host: string;
  device_ids: string[];
  device_name: string;
  slice: ISlice;
  slice_label: string;
  memory_bytes: number;
  held_seconds: number;
  busy_seconds: number;
  idle_release_in: number | null;
  /** The kernel's idle timeout (null: it has none) and whether it is in auto mode. */
  idle_seconds: number | null;
  auto_mode: boolean;
  /** Memory the worker holds now (null: not measured). */
  memory_used_bytes: number | null;
  end_reason: string;
  ended_at?: number | null;
  /** The figures as the kernel writes them (jupyter_gpuattach/figures.py). */
  text?: { held: string; busy: string; memory: string; idle: string };
  /** Busy share (0..1) and memory used over the last minutes, for the sparklines. */
  history?: ISample[];
}

export interface ISample {
  t: number;
  busy: number;
  memory_used: number;
}

export interface IDevice {
  device_id: string;
  host: string;
  name: string;
  kind: string;
  memory_bytes: number;
  allocated_bytes: number;
  free_bytes: number;
  leases: number;
  online: boolean;
  exclusive: boolean;
  draining: boolean;
}

export interface IHost {
  host: string;
  devices: IDevice[];
}

export interface IQueued {
  user: string;
  kernel_id: string;
  position: number;
  estimated_wait_seconds: number;
}

export interface IPool {
  broker: { address: string; embedded: boolean; state: string; error: string };
  hosts: IHost[];
  devices_total: number;
  devices_free: number;
  memory_total_bytes: number;
  memory_used_bytes: number;
  queue_length: number;
  queue: IQueued[];
  active_leases: number;
  agents_online: number;
  now: number;
}

export interface ILeases {
  user: string;
  admin: boolean;
  leases: ILease[];
  /** Leases of the user that ended in the last minutes (asked with `recent`). */
  ended?: ILease[];
  now: number;
}

/** Call `/gpuattach/api/<path>`; a non-2xx answer rejects with the server's message. */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'gpuattach', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text for the error message
    }
  }
  if (!response.ok) {
    const message = (data && data.message) || String(data) || response.statusText;
    throw new ServerConnection.ResponseError(response, message);
  }
  return data as T;
}

export function fetchPool(): Promise<IPool> {
  return requestAPI<IPool>('pool');
}

export function fetchLeases(all = false, recent = 0): Promise<ILeases> {
  const query = [all ? 'all=1' : '', recent > 0 ? `recent=${recent}` : ''].filter(Boolean);
  return requestAPI<ILeases>(query.length ? `leases?${query.join('&')}` : 'leases');
}

export function releaseLease(
  leaseId: string,
  reason = 'released from the JupyterLab GPU panel'
): Promise<unknown> {
  return requestAPI(`leases/${encodeURIComponent(leaseId)}/release`, {
    method: 'POST',
    body: JSON.stringify({ reason })
  });
}

export function setKernelIdle(kernelId: string, seconds: number): Promise<unknown> {
  return requestAPI(`kernels/${encodeURIComponent(kernelId)}/idle`, {
    method: 'PUT',
    body: JSON.stringify({ seconds })
  });
}
