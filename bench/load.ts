/**
 * Runs the load client (bench/load-client.ts) in its own process and returns what it
 * measured. `measureMax` sizes the pool of pre-signed tokens from a short warm-up run, so
 * that signing never happens while the clock runs and no token is sent twice.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { LoadConfig, LoadResult } from './load-client.ts';
import { BenchFailure, captureStderr, ROOT_DIR, spawnTs, tempDir } from './util.ts';

export type { LoadResult };

/** A load run as the sections describe it (the result file is managed here). */
export type LoadSpec = Omit<LoadConfig, 'resultFile'>;

/** Runs the load client once. @throws BenchFailure if it fails. */
export async function runLoad(spec: LoadSpec): Promise<LoadResult> {
  const dir = tempDir('load');
  try {
    const configFile = path.join(dir, 'config.json');
    const resultFile = path.join(dir, 'result.json');
    fs.writeFileSync(configFile, JSON.stringify({ ...spec, resultFile } satisfies LoadConfig));
    const child = spawnTs(path.join(ROOT_DIR, 'bench/load-client.ts'), [configFile], {
      cwd: ROOT_DIR,
    });
    const stderr = captureStderr(child);
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    if (code !== 0 || !fs.existsSync(resultFile)) {
      throw new BenchFailure(`load client failed (exit ${String(code)}): ${stderr()}`);
    }
    return JSON.parse(fs.readFileSync(resultFile, 'utf8')) as LoadResult;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Fails the bench on any non-2xx answer, transport error or wrong cards. */
export function assertClean(label: string, r: LoadResult): void {
  if (r.non2xx > 0 || r.errors > 0 || r.timeouts > 0 || r.mismatches > 0) {
    throw new BenchFailure(
      `${label}: ${r.non2xx} non-2xx, ${r.errors} errors, ${r.timeouts} timeouts, ${r.mismatches} wrong answers${r.firstMismatch ? ` (${r.firstMismatch})` : ''}`,
    );
  }
}

/**
 * Maximum throughput: a warm-up run (which also estimates the rate), then the measured run
 * with enough pre-signed tokens for it; a run that used up its tokens is repeated with more.
 */
export async function measureMax(
  label: string,
  spec: Omit<LoadSpec, 'tokens'>,
  warmupSec: number,
  serverPid?: number,
): Promise<LoadResult> {
  // Without a warm-up, guess generously (smoke runs are short).
  let rate = 500;
  if (warmupSec > 0) {
    const warm = await runLoad({
      ...spec,
      durationSec: warmupSec,
      tokens: Math.min(4000, 600 * warmupSec),
      reuseTokens: true,
    });
    if (spec.reuseTokens || warm.errors > 0 || warm.mismatches > 0) {
      assertClean(`${label} (warm-up)`, warm);
    }
    rate = Math.max(warm.rps, 50);
  }
  for (let attempt = 0; attempt < 3; attempt++) {
    const tokens = spec.reuseTokens
      ? Math.min(4000, Math.ceil(rate * spec.durationSec) + 100)
      : Math.ceil(rate * 1.5 * spec.durationSec + 200 + spec.connections * 2);
    // The server's CPU is read by the load client over the clock's window.
    const r = await runLoad({ ...spec, tokens, ...(serverPid !== undefined ? { serverPid } : {}) });
    if (!r.exhausted) {
      assertClean(label, r);
      if (process.env.BENCH_THREADS) {
        const parts = Object.entries(r.cpu.serverThreads)
          .filter(([, ms]) => ms >= 0.01)
          .map(([name, ms]) => `${name} ${ms.toFixed(2)}`);
        process.stderr.write(`  [threads] ${label}, server ms per call: ${parts.join(', ')}\n`);
      }
      return r;
    }
    rate = Math.max(rate * 2, r.rps * 1.5);
  }
  throw new BenchFailure(`${label}: ran out of pre-signed tokens three times`);
}

/** A run at a fixed overall rate (requests per second over all connections). */
export async function measureAtRate(
  label: string,
  spec: Omit<LoadSpec, 'tokens' | 'overallRate'>,
  rate: number,
): Promise<LoadResult> {
  const tokens = Math.ceil(rate * 1.3 * spec.durationSec + 200 + spec.connections * 2);
  const r = await runLoad({ ...spec, overallRate: Math.max(1, Math.floor(rate)), tokens });
  if (r.exhausted) {
    throw new BenchFailure(`${label}: ran out of pre-signed tokens`);
  }
  assertClean(label, r);
  return r;
}
