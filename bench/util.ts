/**
 * Small helpers shared by the bench sections: timing loops, a failure type that makes the
 * bench exit non-zero, child processes, temporary directories, formatting.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root (the bench reads fixtures and starts the server from here). */
export const ROOT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** A result that must fail the bench run (non-zero exit), e.g. a wrong answer. */
export class BenchFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** CPU time of this process (user + system), in ms. */
export function cpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

/**
 * Runs `fn` repeatedly for at least `minMs` of wall time (after a short warm-up) and returns
 * the mean CPU time of one run in milliseconds. CPU time, not wall time: other processes on
 * the machine then disturb the figure much less.
 */
export function timeLoop(fn: () => void, minMs: number): number {
  const warmUntil = performance.now() + Math.min(200, minMs / 4);
  do {
    fn();
  } while (performance.now() < warmUntil);
  let n = 0;
  const started = performance.now();
  const cpu0 = cpuMs();
  do {
    fn();
    n++;
  } while (performance.now() - started < minMs);
  return (cpuMs() - cpu0) / n;
}

/**
 * Times several variants in alternating rounds (A B C, A B C, ...) and returns each one's
 * median: a slow moment of the machine then hits every variant alike.
 */
export function timeRounds(
  variants: Record<string, () => void>,
  rounds: number,
  msPerRound: number,
): Record<string, number> {
  const samples: Record<string, number[]> = {};
  for (let r = 0; r < rounds; r++) {
    for (const [name, fn] of Object.entries(variants)) {
      (samples[name] ??= []).push(timeLoop(fn, msPerRound));
    }
  }
  const out: Record<string, number> = {};
  for (const [name, list] of Object.entries(samples)) {
    const sorted = [...list].sort((a, b) => a - b);
    out[name] = sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
  }
  return out;
}

/** A fresh temporary directory (`cellcds-bench-*`). */
export function tempDir(label: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `cellcds-bench-${label}-`));
}

/** A free TCP port on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => {
        resolve(port);
      });
    });
  });
}

/** Resolves once `url` answers (any status), or rejects after `timeoutMs`. */
export async function waitForHttp(
  url: string,
  timeoutMs: number,
  child?: ChildProcess,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (child && child.exitCode !== null) {
      throw new BenchFailure(`${url}: the process exited (code ${String(child.exitCode)})`);
    }
    try {
      await fetch(url);
      return;
    } catch {
      if (Date.now() > until) {
        throw new BenchFailure(`${url} did not come up within ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** Node with the tsx loader, as `npm start` runs the server. */
export function spawnTs(
  script: string,
  args: string[],
  opts: {
    env?: Record<string, string>;
    cwd: string;
    stdout?: 'ignore' | 'pipe';
    stderr?: 'ignore' | 'pipe' | 'inherit';
  },
): ChildProcess {
  const prof = process.env.BENCH_CPU_PROF;
  const profArgs =
    prof !== undefined && script.endsWith('cli.ts') ? ['--cpu-prof', `--cpu-prof-dir=${prof}`] : [];
  return spawn(process.execPath, [...profArgs, '--import', 'tsx', script, ...args], {
    cwd: opts.cwd,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', opts.stdout ?? 'ignore', opts.stderr ?? 'pipe'],
  });
}

/** Stops a child (SIGTERM, then SIGKILL after `graceMs`). */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise<void>((resolve) =>
    child.once('exit', () => {
      resolve();
    }),
  );
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

/**
 * CPU time (user + system, all threads) another process has used so far, in ms (Linux /proc;
 * clock ticks of 10 ms), or NaN.
 */
export function processCpuMs(pid: number | undefined): number {
  if (pid === undefined) {
    return Number.NaN;
  }
  try {
    return statCpuMs(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return Number.NaN;
  }
}

/** utime + stime of a /proc `stat` line (a process's or a thread's), in ms (10 ms ticks). */
function statCpuMs(stat: string): number {
  // Fields after the command name (which may hold spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/**
 * CPU time (user + system, in ms) of each of another process's threads, keyed `main` for the
 * main thread and `<name>:<tid>` for the others (Linux /proc/<pid>/task/<tid>/stat; under
 * Node 20 every other thread is named `node`: V8's helpers, libuv's pool, the evaluation
 * workers), or an empty map.
 */
export function threadCpuMs(pid: number | undefined): Map<string, number> {
  const out = new Map<string, number>();
  if (pid === undefined) {
    return out;
  }
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tids) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      const name =
        tid === String(pid)
          ? 'main'
          : `${stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))}:${tid}`;
      out.set(name, statCpuMs(stat));
    } catch {
      // The thread ended meanwhile.
    }
  }
  return out;
}

/**
 * A throughput ratio measured A-B-A: `measured` over the mean of its reference run before and
 * after it, so a machine that got busier or quieter meanwhile moves both sides alike.
 */
export function abaRatio(measured: number, before: number, after: number): number {
  return measured / ((before + after) / 2);
}

/** The machine's idle and total CPU time so far (Linux /proc/stat, clock ticks). */
export function machineIdle(): { idle: number; total: number } {
  try {
    // The first line: "cpu  user nice system idle iowait irq softirq steal guest guest_nice";
    // guest time is already counted in user and nice, so the total is the first eight.
    const first = /^cpu\s+(.*)$/m.exec(fs.readFileSync('/proc/stat', 'utf8'))?.[1] ?? '';
    const cpu = first.trim().split(/\s+/).slice(0, 8).map(Number);
    return { idle: (cpu[3] ?? 0) + (cpu[4] ?? 0), total: cpu.reduce((a, b) => a + b, 0) };
  } catch {
    return { idle: Number.NaN, total: Number.NaN };
  }
}

/** Resident set size of a process in MB (Linux /proc), or NaN. */
export function rssMb(pid: number | undefined): number {
  if (pid === undefined) {
    return Number.NaN;
  }
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /VmRSS:\s+(\d+) kB/.exec(status);
    return m ? Number(m[1]) / 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** Collects a child's stderr (bounded) for error messages. */
export function captureStderr(child: ChildProcess, max = 8192): () => string {
  let text = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    text = (text + chunk.toString('utf8')).slice(-max);
  });
  return () => text;
}

/** Formats a number with a fixed number of decimals (NaN as "-"). */
export function fmt(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '-';
}
