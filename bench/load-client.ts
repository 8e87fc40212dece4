/**
 * The load generator, run in its own process (`node --import tsx bench/load-client.ts
 * <config.json>`): pre-signs every JWT it will send (unique `jti` each, on worker threads,
 * before the clock starts), then drives autocannon with a fixed number of connections for a
 * fixed duration (optionally at a fixed overall rate), and checks every answer: status 2xx and,
 * when expected cards are given, the exact list of card summaries. Writes its result as JSON
 * to the file named in the config.
 */
import fs from 'node:fs';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import autocannon from 'autocannon';
import type { ClientKey } from './tokens.ts';
import { signTokens } from './tokens.ts';
import { machineIdle, processCpuMs, threadCpuMs } from './util.ts';

/** What the parent asks for. */
export interface LoadConfig {
  url: string;
  connections: number;
  durationSec: number;
  /** Requests per second over all connections (autocannon `overallRate`); default: as fast as possible. */
  overallRate?: number;
  /** Request bodies (JSON text), sent in turn. */
  bodies: string[];
  /** Expected card summaries per body (same order), or null to check only for 2xx. */
  expected: Array<string[] | null>;
  /** Signing keys; tokens are spread over them in turn (one tenant per key). */
  signers: Array<{ key: ClientKey; tenant: string }>;
  aud: string;
  /** Tokens to pre-sign. */
  tokens: number;
  /** Cycle through the tokens when they run out (only for a server that keeps no replay cache). */
  reuseTokens: boolean;
  /** The server's process id: its CPU over the run is read from /proc (Linux). */
  serverPid?: number;
  resultFile: string;
}

/**
 * Where the CPU went while the clock ran (between autocannon's start and its end, so token
 * signing and process start-up are left out). Linux /proc; NaN elsewhere.
 */
export interface CpuWindow {
  /** The machine's idle share over the run (0-1, all cores). */
  machineIdle: number;
  /** This load client's CPU per call, ms. */
  clientMsPerCall: number;
  /** The server's CPU per call over all its threads, ms. */
  serverMsPerCall: number;
  /** The server's main thread (JavaScript's event loop) per call, ms. */
  serverMainMsPerCall: number;
  /** The server's CPU per call by thread (name:tid; "main" is the main thread), ms. */
  serverThreads: Record<string, number>;
}

/** What the child reports. */
export interface LoadResult {
  /** Mean requests per second over the run. */
  rps: number;
  total: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  non2xx: number;
  errors: number;
  timeouts: number;
  /** Answers whose cards differ from the expected ones. */
  mismatches: number;
  firstMismatch?: string;
  /** The run used up its pre-signed tokens (it stopped early; rerun with more). */
  exhausted: boolean;
  durationSec: number;
  signMs: number;
  cpu: CpuWindow;
}

const SIGN_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const crypto = require('node:crypto');
const { key, claims, count } = workerData;
const privateKey = crypto.createPrivateKey(key.privatePem);
const b64 = (v) => Buffer.from(v).toString('base64url');
const head = b64(JSON.stringify({ alg: key.alg, typ: 'JWT', kid: key.kid }));
const iat = Math.floor(Date.now() / 1000);
const out = new Array(count);
for (let i = 0; i < count; i++) {
  const input = head + '.' + b64(JSON.stringify({ iss: key.iss, aud: claims.aud, tenant: claims.tenant, iat, exp: iat + 3000, jti: crypto.randomUUID() }));
  const sig = key.alg === 'ES384'
    ? crypto.sign('sha384', Buffer.from(input), { key: privateKey, dsaEncoding: 'ieee-p1363' })
    : crypto.sign('sha384', Buffer.from(input), privateKey);
  out[i] = input + '.' + sig.toString('base64url');
}
parentPort.postMessage(out);
`;

function signOnWorker(
  key: ClientKey,
  tenant: string,
  aud: string,
  count: number,
): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const w = new Worker(SIGN_WORKER, {
      eval: true,
      workerData: { key, claims: { aud, tenant }, count },
    });
    w.once('message', (tokens: string[]) => {
      resolve(tokens);
      void w.terminate();
    });
    w.once('error', reject);
  });
}

/** Pre-signs `total` tokens spread over the signers (round-robin), using every core. */
async function presign(config: LoadConfig): Promise<string[]> {
  const { signers, tokens: total, aud } = config;
  const perSigner = Math.ceil(total / signers.length);
  const threads = Math.max(1, availableParallelism());
  const lists: string[][] = new Array<string[]>(signers.length);
  if (signers.length === 1) {
    const signer = signers[0];
    if (!signer) {
      throw new Error('load: no signer');
    }
    const chunk = Math.ceil(perSigner / threads);
    const parts = await Promise.all(
      Array.from({ length: threads }, () => signOnWorker(signer.key, signer.tenant, aud, chunk)),
    );
    lists[0] = parts.flat();
  } else {
    // Many tenants: few tokens each, signed in this thread.
    signers.forEach((s, i) => {
      lists[i] = signTokens(s.key, { aud, tenant: s.tenant }, perSigner);
    });
  }
  const out: string[] = [];
  for (let i = 0; i < perSigner; i++) {
    for (const list of lists) {
      const t = list[i];
      if (t !== undefined) {
        out.push(t);
      }
    }
  }
  return out;
}

function summariesOf(body: Buffer | string | undefined): string[] | undefined {
  try {
    const parsed = JSON.parse(typeof body === 'string' ? body : (body?.toString('utf8') ?? '')) as {
      cards?: Array<{ summary?: unknown }>;
    };
    return (parsed.cards ?? []).map((c) => String(c.summary));
  } catch {
    return undefined;
  }
}

interface CpuSnapshot {
  machine: { idle: number; total: number };
  clientMs: number;
  serverMs: number;
  threads: Map<string, number>;
}

function cpuSnapshot(serverPid: number | undefined): CpuSnapshot {
  const own = process.cpuUsage();
  return {
    machine: machineIdle(),
    clientMs: (own.user + own.system) / 1000,
    serverMs: processCpuMs(serverPid),
    threads: threadCpuMs(serverPid),
  };
}

function cpuWindow(a: CpuSnapshot, b: CpuSnapshot, calls: number): CpuWindow {
  const per = (ms: number): number => (calls > 0 ? ms / calls : Number.NaN);
  const serverThreads: Record<string, number> = {};
  for (const [name, ms] of b.threads) {
    serverThreads[name] = per(ms - (a.threads.get(name) ?? 0));
  }
  return {
    machineIdle: (b.machine.idle - a.machine.idle) / (b.machine.total - a.machine.total),
    clientMsPerCall: per(b.clientMs - a.clientMs),
    serverMsPerCall: per(b.serverMs - a.serverMs),
    serverMainMsPerCall: serverThreads.main ?? Number.NaN,
    serverThreads,
  };
}

async function main(): Promise<void> {
  const file = process.argv[2];
  if (!file) {
    throw new Error('usage: load-client.ts <config.json>');
  }
  const config = JSON.parse(fs.readFileSync(file, 'utf8')) as LoadConfig;
  const signStarted = performance.now();
  const tokens = await presign(config);
  const signMs = performance.now() - signStarted;
  const bodies = config.bodies.map((b) => Buffer.from(b));
  const expected = config.expected.map((e) => (e ? e.join('\u0000') : null));
  let next = 0;
  let bodyNext = 0;
  let exhausted = false;
  let mismatches = 0;
  let firstMismatch: string | undefined;
  const url = new URL(config.url);
  const cpuBefore = cpuSnapshot(config.serverPid);
  const instance = autocannon({
    url: url.origin,
    connections: config.connections,
    duration: config.durationSec,
    ...(config.overallRate !== undefined ? { overallRate: config.overallRate } : {}),
    requests: [
      {
        method: 'POST',
        path: url.pathname,
        setupRequest: (req: Record<string, unknown>, context: Record<string, unknown>) => {
          if (next >= tokens.length) {
            if (!config.reuseTokens && !exhausted) {
              exhausted = true;
              instance.stop();
            }
            next = 0;
          }
          const k = bodyNext++ % bodies.length;
          context.body = k;
          req.headers = {
            'content-type': 'application/json',
            authorization: `Bearer ${tokens[next++] ?? ''}`,
          };
          req.body = bodies[k];
          return req;
        },
        onResponse: (status: number, body: string, context: Record<string, unknown>) => {
          const k = context.body as number;
          const want = expected[k];
          if (status < 200 || status > 299 || want === null || want === undefined) {
            return;
          }
          const got = summariesOf(body);
          if (got?.join('\u0000') !== want) {
            mismatches++;
            firstMismatch ??= `body ${k}: got ${JSON.stringify(got)}, expected ${JSON.stringify(want.split('\u0000'))}`;
          }
        },
      },
    ],
  });
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    instance.on('done', resolve);
    instance.on('error', reject);
  });
  const cpu = cpuWindow(cpuBefore, cpuSnapshot(config.serverPid), result.requests.total);
  const out: LoadResult = {
    rps: result.requests.average,
    total: result.requests.total,
    p50: result.latency.p50,
    p90: result.latency.p90,
    p99: result.latency.p99,
    max: result.latency.max,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    mismatches,
    ...(firstMismatch !== undefined ? { firstMismatch } : {}),
    exhausted,
    durationSec: result.duration,
    signMs,
    cpu,
  };
  fs.writeFileSync(config.resultFile, JSON.stringify(out));
}

main().catch((err: unknown) => {
  process.stderr.write(
    `load-client: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
  );
  process.exit(1);
});
