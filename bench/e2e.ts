/**
 * Section 1, end to end: order-sign calls with realistic prefetch built from Synthea patients
 * (an NSAID draft each) against the bare-Express baseline (bench/baseline.ts) and against the
 * real cellcds server (shipped pack, persistence as wired), with autocannon in its own process,
 * for ES384 and RS384 clients: requests/s, p50, p99, the throughput ratio, and p99 at half of
 * cellcds' maximum rate. Every answer is checked: the baseline must answer 2xx, cellcds must
 * answer exactly the expected cards.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { evaluateInline } from '../rules/index.ts';
import type { CompiledPack } from '../rules/index.ts';
import type { BaselineConfig } from './baseline.ts';
import type { CellcdsServer } from './cellcds.ts';
import { adminCall, prepareControlPlane, serviceUrl, startCellcds } from './cellcds.ts';
import type { BenchPatient } from './fixtures.ts';
import { requestFor, serviceFor } from './fixtures.ts';
import type { LoadResult } from './load.ts';
import { measureAtRate, measureMax } from './load.ts';
import { RuleByRuleFhirpath } from './reference.ts';
import type { BenchAlg, ClientKey } from './tokens.ts';
import { createClientKey, signTokens } from './tokens.ts';
import {
  abaRatio,
  BenchFailure,
  captureStderr,
  freePort,
  ROOT_DIR,
  spawnTs,
  stopChild,
  tempDir,
  waitForHttp,
} from './util.ts';

export const E2E_TENANT = 'bench';
export const E2E_ISSUER = 'https://ehr.bench.cellcds.example';

export interface LoadFigures {
  rps: number;
  p50: number;
  p99: number;
}

export interface AlgResult {
  /** The baseline at full speed, before cellcds' run. */
  baseline: LoadFigures;
  /**
   * The baseline again, right after cellcds' run: the ratio divides by the mean of the two, so
   * a machine that got busier or quieter meanwhile moves both sides alike (A-B-A).
   */
  baselineAfter: LoadFigures;
  cellcds: LoadFigures;
  /**
   * CPU time of the server process (all its threads) per call at full speed, ms: what a call
   * costs, steadier than req/s on a shared machine.
   */
  cpuMsPerCall?: { baseline: number; cellcds: number };
  /**
   * The server's main thread per call at full speed, ms: both servers run their HTTP and
   * JavaScript work on it, so it bounds their rate when the machine has CPU to spare.
   */
  mainThreadMsPerCall?: { baseline: number; cellcds: number };
  /** The machine's idle share (0-1) while the full-speed run's clock ran. */
  machineIdle?: { baseline: number; cellcds: number };
  /** The load client's own CPU per call at full speed, ms (it shares the machine). */
  clientMsPerCall?: { baseline: number; cellcds: number };
  /** cellcds req/s ÷ the baseline's req/s (the mean of its runs before and after cellcds'). */
  ratio: number;
  /** cellcds at half its maximum rate (autocannon overallRate). */
  half: LoadFigures & { rate: number };
}

export interface E2eResult {
  patients: number;
  bodyKb: number;
  connections: number;
  durationSec: number;
  algs: Partial<Record<BenchAlg, AlgResult>>;
  /** Hook p99 at a fixed rate before and while the tenant's records are rewrapped (section 4). */
  rotation?: RotationProbe;
}

/** Section 4's hook part, measured on the end-to-end server after its runs. */
export interface RotationProbe {
  rate: number;
  idle: LoadFigures;
  rewrapping: LoadFigures;
  /** Records the job moved, and of how many; its status when the window ended. */
  jobDone: number;
  jobTotal: number;
  jobStatus: string;
  /** How long the job ran (s), against the measuring window. */
  jobSec: number;
  windowSec: number;
}

/** Calls whose expected cards are known: bodies, and summaries per body. */
export interface CallSet {
  serviceId: string;
  bodies: string[];
  expected: string[][];
}

const figures = (r: LoadResult): LoadFigures => ({ rps: r.rps, p50: r.p50, p99: r.p99 });

/**
 * The order-sign bodies of these patients and the cards cellcds must answer (computed in
 * process with the engine, whose fired rules must equal rule-by-rule fhirpath.js).
 * @throws BenchFailure if the engine and fhirpath.js disagree, or a warfarin patient gets no
 *   warfarin card.
 */
export function buildCallSet(pack: CompiledPack, patients: readonly BenchPatient[]): CallSet {
  const service = serviceFor(pack.pack, 'order-sign');
  const reference = new RuleByRuleFhirpath(pack.pack);
  const ruleIds = pack.pack.rules.filter((r) => r.service === service.id).map((r) => r.id);
  const bodies: string[] = [];
  const expected: string[][] = [];
  const now = new Date();
  for (const patient of patients) {
    const request = requestFor(pack.pack, patient, 'order-sign');
    const input = {
      hook: request.hook,
      hookInstance: crypto.randomUUID(),
      context: request.context,
      prefetch: request.prefetch ?? {},
      now,
    };
    bodies.push(
      JSON.stringify({
        hook: input.hook,
        hookInstance: input.hookInstance,
        context: input.context,
        prefetch: input.prefetch,
      }),
    );
    const result = evaluateInline(pack, service.id, structuredClone(input));
    const fired = result.trace.filter((t) => t.fired).map((t) => t.ruleId);
    const refFired = reference.fired(input, ruleIds);
    if (fired.join(',') !== refFired.join(',')) {
      throw new BenchFailure(`e2e expectations: engine and fhirpath.js differ for ${patient.name}`);
    }
    const onWarfarin = ['Mafalda_Turcotte', 'Derek_Becker', 'Kyla_Zulauf'].includes(patient.name);
    if (onWarfarin && !fired.includes('warfarin-nsaid')) {
      throw new BenchFailure(`e2e expectations: no warfarin card for ${patient.name}`);
    }
    expected.push(result.cards.map((c) => c.summary));
  }
  return { serviceId: service.id, bodies, expected };
}

async function startBaseline(
  config: Omit<BaselineConfig, 'port'>,
): Promise<{ url: string; pid: number | undefined; stop(): Promise<void> }> {
  const port = await freePort();
  const dir = tempDir('baseline');
  const file = path.join(dir, 'config.json');
  fs.writeFileSync(file, JSON.stringify({ ...config, port } satisfies BaselineConfig));
  const child = spawnTs(path.join(ROOT_DIR, 'bench/baseline.ts'), [file], { cwd: ROOT_DIR });
  const stderr = captureStderr(child);
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitForHttp(url, 30_000, child);
  } catch (err) {
    await stopChild(child);
    throw new BenchFailure(`baseline did not start: ${String(err)} ${stderr()}`);
  }
  return {
    url,
    pid: child.pid,
    stop: async () => {
      await stopChild(child);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Sends each body once (fresh token) and checks the answer. @throws BenchFailure. */
export async function probe(
  label: string,
  url: string,
  calls: CallSet,
  key: ClientKey,
  aud: string,
  tenant: string,
  checkCards: boolean,
): Promise<void> {
  const tokens = signTokens(key, { aud, tenant }, calls.bodies.length);
  for (const [i, body] of calls.bodies.entries()) {
    const res = await fetch(`${url}/cds-services/${calls.serviceId}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${tokens[i] ?? ''}` },
      body,
    });
    const text = await res.text();
    if (res.status !== 200) {
      throw new BenchFailure(`${label}: call ${i} answered ${res.status}: ${text.slice(0, 300)}`);
    }
    if (checkCards) {
      const got = ((JSON.parse(text) as { cards?: Array<{ summary: string }> }).cards ?? []).map(
        (c) => c.summary,
      );
      if (JSON.stringify(got) !== JSON.stringify(calls.expected[i])) {
        throw new BenchFailure(
          `${label}: call ${i} cards ${JSON.stringify(got)}, expected ${JSON.stringify(calls.expected[i])}`,
        );
      }
    }
  }
}

export interface E2eOptions {
  packRaw: unknown;
  pack: CompiledPack;
  patients: readonly BenchPatient[];
  algs: readonly BenchAlg[];
  connections: number;
  durationSec: number;
  warmupSec: number;
  /** Also measure the hook p99 before and during a key rotation of the tenant (section 4). */
  rotationProbe?: boolean;
  log: (line: string) => void;
}

/** Runs section 1. */
export async function runE2eSection(opts: E2eOptions): Promise<E2eResult> {
  const dataDir = tempDir('e2e');
  const keys = Object.fromEntries(
    opts.algs.map((alg) => [alg, createClientKey(alg, E2E_ISSUER)]),
  ) as Record<BenchAlg, ClientKey>;
  const jwks = { keys: Object.values(keys).map((k) => k.publicJwk) };
  let server: CellcdsServer | undefined;
  let baseline: { url: string; pid: number | undefined; stop(): Promise<void> } | undefined;
  try {
    await prepareControlPlane(dataDir, opts.packRaw, [
      { id: E2E_TENANT, issuers: [{ iss: E2E_ISSUER, jwks }] },
    ]);
    server = await startCellcds(dataDir);
    baseline = await startBaseline({
      publicUrl: server.publicUrl,
      issuers: { [E2E_ISSUER]: jwks.keys },
      bodyLimitBytes: 5 * 1024 * 1024,
    });
    const calls = buildCallSet(opts.pack, opts.patients);
    const aud = serviceUrl(server.publicUrl, calls.serviceId);
    const bodyKb = calls.bodies.reduce((n, b) => n + b.length, 0) / calls.bodies.length / 1024;
    const algs: E2eResult['algs'] = {};
    for (const alg of opts.algs) {
      const key = keys[alg];
      await probe(`baseline ${alg}`, baseline.url, calls, key, aud, E2E_TENANT, false);
      await probe(`cellcds ${alg}`, server.url, calls, key, aud, E2E_TENANT, true);
      const common = {
        connections: opts.connections,
        durationSec: opts.durationSec,
        bodies: calls.bodies,
        signers: [{ key, tenant: E2E_TENANT }],
        aud,
      };
      const { url: baselineUrl, pid: baselinePid } = baseline;
      const baselineRun = (label: string) =>
        measureMax(
          label,
          {
            ...common,
            url: `${baselineUrl}/cds-services/${calls.serviceId}`,
            expected: calls.bodies.map(() => null),
            reuseTokens: true,
          },
          opts.warmupSec,
          baselinePid,
        );
      opts.log(`  ${alg}: baseline at full speed`);
      const base = await baselineRun(`baseline ${alg}`);
      opts.log(`  ${alg}: cellcds at full speed`);
      const cell = await measureMax(
        `cellcds ${alg}`,
        {
          ...common,
          url: `${server.url}/cds-services/${calls.serviceId}`,
          expected: calls.expected,
          reuseTokens: false,
        },
        opts.warmupSec,
        server.pid,
      );
      opts.log(`  ${alg}: baseline at full speed again`);
      const baseAfter = await baselineRun(`baseline ${alg} (after cellcds)`);
      const rate = Math.max(1, cell.rps / 2);
      opts.log(`  ${alg}: cellcds at ${Math.floor(rate)} req/s`);
      const half = await measureAtRate(
        `cellcds ${alg} at half rate`,
        {
          ...common,
          url: `${server.url}/cds-services/${calls.serviceId}`,
          expected: calls.expected,
          reuseTokens: false,
        },
        rate,
      );
      algs[alg] = {
        baseline: figures(base),
        baselineAfter: figures(baseAfter),
        cellcds: figures(cell),
        ...(Number.isFinite(base.cpu.serverMsPerCall) && Number.isFinite(cell.cpu.serverMsPerCall)
          ? {
              cpuMsPerCall: {
                baseline: base.cpu.serverMsPerCall,
                cellcds: cell.cpu.serverMsPerCall,
              },
              mainThreadMsPerCall: {
                baseline: base.cpu.serverMainMsPerCall,
                cellcds: cell.cpu.serverMainMsPerCall,
              },
              machineIdle: { baseline: base.cpu.machineIdle, cellcds: cell.cpu.machineIdle },
              clientMsPerCall: {
                baseline: base.cpu.clientMsPerCall,
                cellcds: cell.cpu.clientMsPerCall,
              },
            }
          : {}),
        ratio: abaRatio(cell.rps, base.rps, baseAfter.rps),
        half: { ...figures(half), rate: Math.floor(rate) },
      };
    }
    const result: E2eResult = {
      patients: opts.patients.length,
      bodyKb,
      connections: opts.connections,
      durationSec: opts.durationSec,
      algs,
    };
    const first = opts.algs[0];
    const firstResult = first !== undefined ? algs[first] : undefined;
    if (opts.rotationProbe === true && first !== undefined && firstResult) {
      // The tenant's store now holds every invocation of the runs above: rotate its data key
      // (a scheduled rotation, as an operator would) and call at the same rate meanwhile.
      const rate = firstResult.half.rate;
      const spec = {
        connections: opts.connections,
        durationSec: opts.durationSec,
        bodies: calls.bodies,
        signers: [{ key: keys[first], tenant: E2E_TENANT }],
        aud,
        url: `${server.url}/cds-services/${calls.serviceId}`,
        expected: calls.expected,
        reuseTokens: false,
      };
      opts.log(`  hook p99 at ${rate} req/s, idle`);
      const idle = await measureAtRate('cellcds before a rotation', spec, rate);
      opts.log(`  hook p99 at ${rate} req/s during a rewrap`);
      const job = await adminCall(server, 'POST', `/tenants/${E2E_TENANT}/keys/rotate`, {});
      const during = await measureAtRate('cellcds during a rewrap', spec, rate);
      const info = await adminCall(server, 'GET', `/jobs/${encodeURIComponent(String(job.id))}`);
      const startedAt =
        typeof info.startedAt === 'string' ? Date.parse(info.startedAt) : Date.now();
      const endedAt =
        typeof info.finishedAt === 'string' ? Date.parse(info.finishedAt) : Date.now();
      result.rotation = {
        rate,
        idle: figures(idle),
        rewrapping: figures(during),
        jobDone: Number(info.done),
        jobTotal: Number(info.total),
        jobStatus: String(info.status),
        jobSec: (endedAt - startedAt) / 1000,
        windowSec: opts.durationSec,
      };
    }
    return result;
  } finally {
    await baseline?.stop();
    await server?.stop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}
