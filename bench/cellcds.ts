/**
 * The "cellcds" side of the bench: the real server as `npm start` runs it (a child process,
 * `node --import tsx server/cli.ts serve`, with its own data directory and port), and the
 * control plane it reads, prepared beforehand directly through `openControlPlane` (the
 * shipped pack stored, tenants registered and subscribed) so that thousands of tenants take
 * seconds, not an admin API round trip each.
 */
import crypto from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { validatePack } from '../rules/index.ts';
import type { CompiledPack } from '../rules/index.ts';
import { openControlPlane } from '../tenants/index.ts';
import type { TrustedIssuer } from '../tenants/index.ts';
import {
  BenchFailure,
  captureStderr,
  freePort,
  ROOT_DIR,
  rssMb,
  spawnTs,
  stopChild,
  waitForHttp,
} from './util.ts';

/** The region the bench's server runs as (tenants are registered in it). */
export const BENCH_REGION = 'local';

export interface BenchTenant {
  id: string;
  issuers: TrustedIssuer[];
  /** Subscribe the tenant to the pack (default true). */
  subscribe?: boolean;
}

/**
 * Stores the pack and registers the tenants in `<dataDir>/control.sqlite` through the control
 * plane's repositories (validated as the admin API would), one after another: the control
 * plane queues its writes anyway. Returns the compiled pack and how long registration took.
 */
export async function prepareControlPlane(
  dataDir: string,
  packRaw: unknown,
  tenants: readonly BenchTenant[],
  onProgress?: (done: number) => void,
): Promise<{ pack: CompiledPack; registerMs: number }> {
  const controlPlane = await openControlPlane({ storage: path.join(dataDir, 'control.sqlite') });
  try {
    const pack = await validatePack(packRaw, { runTests: false });
    await controlPlane.packs.put({
      id: pack.id,
      version: pack.version,
      hash: pack.hash,
      pack: pack.pack,
      uploadedBy: 'bench',
    });
    const started = performance.now();
    const subscriptions = [{ pack: pack.id, version: pack.version }];
    let done = 0;
    for (const t of tenants) {
      await controlPlane.tenants.create({
        id: t.id,
        name: `Bench tenant ${t.id}`,
        region: BENCH_REGION,
        issuers: t.issuers,
      });
      if (t.subscribe !== false) {
        await controlPlane.tenants.setSubscriptions(t.id, subscriptions);
      }
      done++;
      if (done % 1000 === 0) {
        onProgress?.(done);
      }
    }
    return { pack, registerMs: performance.now() - started };
  } finally {
    await controlPlane.close();
  }
}

/** A running cellcds server. */
export interface CellcdsServer {
  url: string;
  publicUrl: string;
  /** The bootstrap operator token (CELLCDS_ADMIN_TOKEN) for the admin API. */
  adminToken: string;
  pid: number | undefined;
  child: ChildProcess;
  rssMb(): number;
  stop(): Promise<void>;
}

/** The endpoint URL an order-sign token's `aud` names. */
export function serviceUrl(publicUrl: string, serviceId: string): string {
  return `${publicUrl}/cds-services/${serviceId}`;
}

/**
 * Starts `node --import tsx server/cli.ts serve` on a free port with `dataDir`, the demo seed
 * off and logging at the production default (info, to /dev/null). Resolves when it answers.
 */
export async function startCellcds(
  dataDir: string,
  env: Record<string, string> = {},
): Promise<CellcdsServer> {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const adminToken = `bench-operator-${crypto.randomBytes(24).toString('hex')}`;
  const child = spawnTs(path.join(ROOT_DIR, 'server/cli.ts'), ['serve'], {
    cwd: ROOT_DIR,
    env: {
      PORT: String(port),
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_PUBLIC_URL: url,
      CELLCDS_ADMIN_TOKEN: adminToken,
      CELLCDS_REGION: BENCH_REGION,
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_LOG_LEVEL: 'info',
      // Node or V8 flags for the server only (experiments: BENCH_SERVER_NODE_OPTIONS).
      ...(process.env.BENCH_SERVER_NODE_OPTIONS
        ? { NODE_OPTIONS: process.env.BENCH_SERVER_NODE_OPTIONS }
        : {}),
      ...env,
    },
  });
  const stderr = captureStderr(child);
  try {
    await waitForHttp(`${url}/healthz`, 60_000, child);
  } catch (err) {
    await stopChild(child);
    throw new BenchFailure(
      `cellcds did not start: ${err instanceof Error ? err.message : String(err)}\n${stderr()}`,
    );
  }
  return {
    url,
    publicUrl: url,
    adminToken,
    pid: child.pid,
    child,
    rssMb: () => rssMb(child.pid),
    stop: () => stopChild(child),
  };
}

/** Calls the admin API as the bootstrap operator. @throws BenchFailure on a non-2xx answer. */
export async function adminCall(
  server: CellcdsServer,
  method: 'GET' | 'POST',
  pathname: string,
  body?: unknown,
): Promise<Record<string, unknown>> {
  const res = await fetch(`${server.url}/admin${pathname}`, {
    method,
    headers: {
      authorization: `Bearer ${server.adminToken}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  if (res.status < 200 || res.status > 299) {
    throw new BenchFailure(`admin ${method} ${pathname}: ${res.status} ${text.slice(0, 300)}`);
  }
  return JSON.parse(text) as Record<string, unknown>;
}
