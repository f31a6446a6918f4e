/** Leases and pools as the server's REST API answers (shapes of api.ts). */
import type { ILease, IPool } from '../src/api';

export const GIB = 1024 ** 3;

export function lease(changes: Partial<ILease> = {}): ILease {
  return {
    lease_id: 'abcd1234ef567890',
    user: 'alice',
    kernel_id: 'k1',
    notebook: 'train.ipynb',
    state: 'active',
    host: 'gpu-1',
    device_ids: ['gpu-1/0'],
    device_name: 'NVIDIA A100-SXM4-80GB',
    slice: { memory_bytes: 0, fraction: 0.5, gpus: 1 },
    slice_label: '0.5×A100',
    memory_bytes: 40 * GIB,
    held_seconds: 100,
    busy_seconds: 25,
    idle_release_in: null,
    idle_seconds: null,
    auto_mode: false,
    memory_used_bytes: null,
    end_reason: '',
    ...changes
  };
}

export function pool(changes: Partial<IPool> = {}): IPool {
  return {
    broker: { address: 'unix:/tmp/b', embedded: true, state: 'running', error: '' },
    hosts: [],
    devices_total: 2,
    devices_free: 1,
    memory_total_bytes: 80 * GIB,
    memory_used_bytes: 40 * GIB,
    queue_length: 0,
    queue: [],
    active_leases: 1,
    agents_online: 1,
    now: 1000,
    ...changes
  };
}
