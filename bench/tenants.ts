/**
 * Section 3, tenants at scale: a cellcds server whose control plane holds `tenants` registered
 * tenants (each with its own EHR issuer); order-sign calls all on one tenant, then spread
 * round-robin over `spread` of them (each signed by that tenant's own key). Reports the
 * throughput ratio (spread ÷ single) and the server's resident memory.
 */
import fs from 'node:fs';
import type { CompiledPack } from '../rules/index.ts';
import type { BenchTenant } from './cellcds.ts';
import { prepareControlPlane, serviceUrl, startCellcds } from './cellcds.ts';
import { buildCallSet, probe } from './e2e.ts';
import type { BenchPatient } from './fixtures.ts';
import type { LoadResult } from './load.ts';
import { measureMax } from './load.ts';
import type { ClientKey } from './tokens.ts';
import { createClientKey, signTokens } from './tokens.ts';
import { abaRatio, BenchFailure, tempDir } from './util.ts';

export interface TenantsResult {
  tenants: number;
  spread: number;
  registerSec: number;
  /** The first call of every called tenant (store and keys created), in s. */
  firstCallsSec: number;
  rssIdleMb: number;
  single: TenantRun;
  spreadRun: TenantRun;
  /** One tenant again after the spread run: the ratio divides by the mean of both (A-B-A). */
  singleAfter: TenantRun;
  /** spread req/s ÷ single-tenant req/s (the mean of the runs before and after it). */
  ratio: number;
}

/** One full-speed run of the tenants section. */
export interface TenantRun {
  rps: number;
  p50: number;
  p99: number;
  /** The server's resident memory after the run. */
  rssMb: number;
  /** The server's CPU per call over all its threads, ms. */
  cpuMsPerCall: number;
  /** The server's main thread per call, ms. */
  mainThreadMsPerCall: number;
}

export interface TenantsOptions {
  packRaw: unknown;
  pack: CompiledPack;
  patients: readonly BenchPatient[];
  tenants: number;
  spread: number;
  connections: number;
  durationSec: number;
  warmupSec: number;
  log: (line: string) => void;
}

const run = (r: LoadResult, rssMb: number): TenantRun => ({
  rps: r.rps,
  p50: r.p50,
  p99: r.p99,
  rssMb,
  cpuMsPerCall: r.cpu.serverMsPerCall,
  mainThreadMsPerCall: r.cpu.serverMainMsPerCall,
});

const tenantId = (i: number) => `t${String(i).padStart(5, '0')}`;
const issuerOf = (i: number) => `https://ehr-${String(i)}.bench.cellcds.example`;

/** One call per tenant (8 at a time), each signed by that tenant's key. @throws BenchFailure. */
async function callEachOnce(
  url: string,
  serviceId: string,
  body: string,
  keys: readonly ClientKey[],
  aud: string,
): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      for (let i = next++; i < keys.length; i = next++) {
        const key = keys[i] as ClientKey;
        const [token] = signTokens(key, { aud, tenant: tenantId(i) }, 1);
        const res = await fetch(`${url}/cds-services/${serviceId}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${token ?? ''}` },
          body,
        });
        const text = await res.text();
        if (res.status !== 200) {
          throw new BenchFailure(
            `tenant ${tenantId(i)}: first call answered ${res.status}: ${text.slice(0, 200)}`,
          );
        }
      }
    }),
  );
}

/** Runs section 3. */
export async function runTenantsSection(opts: TenantsOptions): Promise<TenantsResult> {
  const dataDir = tempDir('tenants');
  try {
    // The tenants that receive calls get their own key; the others share one (their keys are
    // never used, only their registrations count).
    const used: ClientKey[] = Array.from({ length: opts.spread }, (_, i) =>
      createClientKey('ES384', issuerOf(i)),
    );
    const idle = createClientKey('ES384', issuerOf(opts.spread));
    const tenants: BenchTenant[] = Array.from({ length: opts.tenants }, (_, i) => {
      const key = used[i];
      return {
        id: tenantId(i),
        issuers: [{ iss: issuerOf(i), jwks: { keys: [(key ?? idle).publicJwk] } }],
        // Only tenants that are called need a subscription.
        subscribe: key !== undefined,
      };
    });
    opts.log(`  registering ${opts.tenants} tenants`);
    const { registerMs } = await prepareControlPlane(dataDir, opts.packRaw, tenants, (n) => {
      opts.log(`    ${n} registered`);
    });
    const server = await startCellcds(dataDir);
    try {
      const calls = buildCallSet(opts.pack, opts.patients);
      const aud = serviceUrl(server.publicUrl, calls.serviceId);
      const first = used[0];
      if (!first) {
        throw new Error('bench: no tenant to call');
      }
      await probe('tenants', server.url, calls, first, aud, tenantId(0), true);
      // One call per tenant first: a tenant's first call creates its store and keys, a one-time
      // cost the measured runs should not carry.
      opts.log(`  first call of each of the ${opts.spread} tenants (creates their stores)`);
      const warmStarted = performance.now();
      await callEachOnce(server.url, calls.serviceId, calls.bodies[0] ?? '{}', used, aud);
      const firstCallsSec = (performance.now() - warmStarted) / 1000;
      const rssIdleMb = server.rssMb();
      const common = {
        url: `${server.url}/cds-services/${calls.serviceId}`,
        connections: opts.connections,
        durationSec: opts.durationSec,
        bodies: calls.bodies,
        expected: calls.expected,
        aud,
        reuseTokens: false,
      };
      const oneTenant = (label: string) =>
        measureMax(
          label,
          { ...common, signers: [{ key: first, tenant: tenantId(0) }] },
          opts.warmupSec,
          server.pid,
        );
      opts.log('  all calls on one tenant');
      const single = await oneTenant('tenants: one tenant');
      const singleRss = server.rssMb();
      opts.log(`  calls spread over ${opts.spread} tenants`);
      const spread = await measureMax(
        `tenants: spread over ${opts.spread}`,
        { ...common, signers: used.map((key, i) => ({ key, tenant: tenantId(i) })) },
        opts.warmupSec,
        server.pid,
      );
      const spreadRss = server.rssMb();
      opts.log('  all calls on one tenant again');
      const singleAfter = await oneTenant('tenants: one tenant again');
      return {
        tenants: opts.tenants,
        spread: opts.spread,
        registerSec: registerMs / 1000,
        firstCallsSec,
        rssIdleMb,
        single: run(single, singleRss),
        spreadRun: run(spread, spreadRss),
        singleAfter: run(singleAfter, server.rssMb()),
        ratio: abaRatio(spread.rps, single.rps, singleAfter.rps),
      };
    } finally {
      await server.stop();
    }
  } finally {
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}
