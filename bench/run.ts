/**
 * `npm run bench` (full, under 10 minutes on a 2-core machine), `npm run bench -- --quick`
 * (under 2 minutes) and `--smoke` (seconds; what spec/bench/bench.spec.ts runs). Runs the
 * sections of issue 6 in one process tree, prints a table, then ONE line of JSON with every
 * figure (ratios first). Exits non-zero if any answer is wrong (cellcds vs the expected cards,
 * the engine vs fhirpath.js) or a section cannot run; a missed target is reported, not fatal.
 *
 * Options: --quick | --smoke, --sections=engine,e2e,tenants,rotation (default all),
 * --algs=ES384,RS384 (the end-to-end section's client algorithms; default both).
 */
import os from 'node:os';
import type { EngineResult } from './engine.ts';
import { runEngineSection } from './engine.ts';
import type { E2eResult } from './e2e.ts';
import { runE2eSection } from './e2e.ts';
import { E2E_PATIENTS, loadPatients, loadShippedPack } from './fixtures.ts';
import type { RotationResult } from './rotation.ts';
import { runRotationSection } from './rotation.ts';
import type { TenantsResult } from './tenants.ts';
import { runTenantsSection } from './tenants.ts';
import type { BenchAlg } from './tokens.ts';
import { BENCH_ALGS } from './tokens.ts';
import { BenchFailure, fmt } from './util.ts';

type Mode = 'full' | 'quick' | 'smoke';
const SECTIONS = ['engine', 'e2e', 'tenants', 'rotation'] as const;
type Section = (typeof SECTIONS)[number];

interface ModeSettings {
  enginePatients?: number;
  engineMinMs: number;
  e2ePatients: number;
  algs: BenchAlg[];
  connections: number;
  durationSec: number;
  warmupSec: number;
  tenants: number;
  spread: number;
  rotationRecords: number;
}

const SETTINGS: Record<Mode, ModeSettings> = {
  full: {
    engineMinMs: 3000,
    e2ePatients: E2E_PATIENTS.length,
    algs: ['ES384', 'RS384'],
    connections: 16,
    durationSec: 10,
    warmupSec: 3,
    tenants: 10_000,
    spread: 1_000,
    rotationRecords: 5_000,
  },
  quick: {
    engineMinMs: 800,
    e2ePatients: E2E_PATIENTS.length,
    algs: ['ES384', 'RS384'],
    connections: 16,
    durationSec: 3,
    warmupSec: 2,
    tenants: 500,
    spread: 100,
    rotationRecords: 1_000,
  },
  smoke: {
    enginePatients: 2,
    engineMinMs: 20,
    e2ePatients: 2,
    algs: ['ES384'],
    connections: 2,
    durationSec: 1,
    warmupSec: 0,
    tenants: 6,
    spread: 3,
    rotationRecords: 20,
  },
};

/** Issue 6's targets, all ratios from one run. */
const TARGETS = {
  e2eThroughputRatio: 0.5,
  p99AtHalfRateMs: 50,
  engineSpeedup: 10,
  tenantSpreadRatio: 0.8,
  rewrapRatio: 0.3,
};

function parseArgs(argv: string[]): { mode: Mode; sections: Section[]; algs?: BenchAlg[] } {
  let mode: Mode = 'full';
  let sections: Section[] = [...SECTIONS];
  let algs: BenchAlg[] | undefined;
  for (const arg of argv) {
    if (arg === '--quick') {
      mode = 'quick';
    } else if (arg === '--smoke') {
      mode = 'smoke';
    } else if (arg.startsWith('--sections=')) {
      const wanted = arg.slice('--sections='.length).split(',');
      const bad = wanted.filter((s) => !(SECTIONS as readonly string[]).includes(s));
      if (bad.length > 0) {
        throw new BenchFailure(
          `unknown section(s): ${bad.join(', ')} (known: ${SECTIONS.join(', ')})`,
        );
      }
      sections = wanted as Section[];
    } else if (arg.startsWith('--algs=')) {
      const wanted = arg
        .slice('--algs='.length)
        .split(',')
        .filter((a) => a !== '');
      if (wanted.length === 0) {
        throw new BenchFailure(`--algs needs at least one of ${BENCH_ALGS.join(', ')}`);
      }
      const bad = wanted.filter((a) => !(BENCH_ALGS as readonly string[]).includes(a));
      if (bad.length > 0) {
        throw new BenchFailure(
          `unknown algorithm(s): ${bad.join(', ')} (known: ${BENCH_ALGS.join(', ')})`,
        );
      }
      algs = wanted as BenchAlg[];
    } else {
      throw new BenchFailure(
        `unknown option ${arg} (use --quick, --smoke, --sections=..., --algs=...)`,
      );
    }
  }
  return { mode, sections, ...(algs ? { algs } : {}) };
}

interface Report {
  engine?: EngineResult;
  e2e?: E2eResult;
  tenants?: TenantsResult;
  rotation?: RotationResult;
}

const startedAt = performance.now();
function log(line: string): void {
  process.stderr.write(
    `[${((performance.now() - startedAt) / 1000).toFixed(1).padStart(6)} s] ${line}\n`,
  );
}

function met(ok: boolean | undefined): string {
  return ok === undefined ? 'n/a' : ok ? 'met' : 'MISSED';
}

function ratios(r: Report) {
  const es = r.e2e?.algs.ES384;
  const rs = r.e2e?.algs.RS384;
  const worstHalfP99 = Math.max(
    ...[es?.half.p99, rs?.half.p99].filter((v): v is number => v !== undefined),
  );
  const out = {
    e2eThroughputES384: es?.ratio,
    e2eThroughputRS384: rs?.ratio,
    p99AtHalfRateMs: Number.isFinite(worstHalfP99) ? worstHalfP99 : undefined,
    engineVsFhirpath: r.engine?.speedupVsFhirpath,
    engineOverFloor: r.engine?.engineOverFloor,
    tenantSpread: r.tenants?.ratio,
    rewrapVsRawAesGcm: r.rotation?.available === true ? r.rotation.rewrapRatio : undefined,
    emergencyResealVsRawAesGcm: r.rotation?.available === true ? r.rotation.resealRatio : undefined,
    hookP99DuringRewrapVsIdle: r.rotation?.hookP99
      ? r.rotation.hookP99.rewrapping / r.rotation.hookP99.idle
      : undefined,
  };
  const targets = {
    e2eThroughputES384: es ? es.ratio >= TARGETS.e2eThroughputRatio : undefined,
    e2eThroughputRS384: rs ? rs.ratio >= TARGETS.e2eThroughputRatio : undefined,
    p99AtHalfRate:
      out.p99AtHalfRateMs !== undefined ? out.p99AtHalfRateMs < TARGETS.p99AtHalfRateMs : undefined,
    engineVsFhirpath: r.engine ? r.engine.speedupVsFhirpath >= TARGETS.engineSpeedup : undefined,
    tenantSpread: r.tenants ? r.tenants.ratio >= TARGETS.tenantSpreadRatio : undefined,
    rewrapVsRawAesGcm:
      out.rewrapVsRawAesGcm !== undefined
        ? out.rewrapVsRawAesGcm >= TARGETS.rewrapRatio
        : undefined,
  };
  return { ratios: out, targets };
}

function printTable(mode: Mode, r: Report): void {
  const lines: string[] = [];
  const row = (label: string, ...cells: string[]) => {
    lines.push(`  ${label.padEnd(44)}${cells.map((c) => c.padStart(12)).join('')}`);
  };
  lines.push(
    `cellcds bench (${mode}), node ${process.version}, ${os.availableParallelism()} cores`,
  );
  if (r.engine) {
    const e = r.engine;
    lines.push(
      '',
      `2. Rule engine: shipped pack, ${e.patients} Synthea patients, ${e.calls} calls`,
    );
    row('', 'µs/call', 'ratio');
    row('cellcds engine', fmt(e.engineUs), '1.0');
    row('fhirpath.js rule by rule', fmt(e.fhirpathUs), `${fmt(e.speedupVsFhirpath)}x`);
    row(
      'engine without its fast path (lets shared)',
      fmt(e.engineNoFastPathUs),
      `${fmt(e.fhirpathUs / e.engineNoFastPathUs)}x`,
    );
    for (const [hook, h] of Object.entries(e.byHook)) {
      row(
        `  ${hook}: engine / fhirpath.js`,
        `${fmt(h.engineUs)} / ${fmt(h.fhirpathUs, 0)}`,
        `${fmt(h.speedup)}x`,
      );
    }
    row(`engine, 3 rules (${e.floorRules.join(', ')})`.slice(0, 44), fmt(e.engineThreeUs), '');
    row('hand-written JavaScript, same 3 rules', fmt(e.handUs, 2), `${fmt(e.engineOverFloor)}x`);
    row('engine through the worker pool (1 call)', fmt(e.evaluatorUs), '');
    row(`fired: ${e.rulesFired} rules on ${e.callsWithCards} calls; fhirpath.js agrees`, '', '');
  }
  if (r.e2e) {
    const e = r.e2e;
    lines.push(
      '',
      `1. End to end: order-sign, ${e.patients} patients (${fmt(e.bodyKb)} KiB bodies), ${e.connections} connections, ${e.durationSec} s`,
    );
    row('', 'req/s', 'p50 ms', 'p99 ms');
    for (const [alg, a] of Object.entries(e.algs)) {
      row(
        `${alg} baseline (Express + crypto.verify)`,
        fmt(a.baseline.rps, 0),
        fmt(a.baseline.p50, 0),
        fmt(a.baseline.p99, 0),
      );
      row(`${alg} cellcds`, fmt(a.cellcds.rps, 0), fmt(a.cellcds.p50, 0), fmt(a.cellcds.p99, 0));
      row(
        `${alg} baseline again, after cellcds`,
        fmt(a.baselineAfter.rps, 0),
        fmt(a.baselineAfter.p50, 0),
        fmt(a.baselineAfter.p99, 0),
      );
      row(
        `${alg} cellcds at half its max (${a.half.rate}/s)`,
        fmt(a.half.rps, 0),
        fmt(a.half.p50, 0),
        fmt(a.half.p99, 0),
      );
      row(`${alg} throughput ratio cellcds/baseline`, fmt(a.ratio, 2));
      if (a.cpuMsPerCall) {
        row(
          `${alg} server CPU per call, all threads (ms)`,
          `${fmt(a.cpuMsPerCall.baseline, 2)} / ${fmt(a.cpuMsPerCall.cellcds, 2)}`,
        );
      }
      if (a.mainThreadMsPerCall) {
        row(
          `${alg} server main thread per call (ms)`,
          `${fmt(a.mainThreadMsPerCall.baseline, 2)} / ${fmt(a.mainThreadMsPerCall.cellcds, 2)}`,
        );
      }
      if (a.machineIdle) {
        row(
          `${alg} machine idle at full speed`,
          `${fmt(a.machineIdle.baseline * 100, 0)} % / ${fmt(a.machineIdle.cellcds * 100, 0)} %`,
        );
      }
    }
  }
  if (r.tenants) {
    const t = r.tenants;
    lines.push(
      '',
      `3. Tenants: ${t.tenants} registered (${fmt(t.registerSec, 0)} s; first calls of ${t.spread} in ${fmt(t.firstCallsSec, 0)} s), calls on 1 vs spread over ${t.spread}`,
    );
    row('', 'req/s', 'p99 ms', 'RSS MB');
    row('server idle', '', '', fmt(t.rssIdleMb, 0));
    row('one tenant', fmt(t.single.rps, 0), fmt(t.single.p99, 0), fmt(t.single.rssMb, 0));
    row(
      `spread over ${t.spread}`,
      fmt(t.spreadRun.rps, 0),
      fmt(t.spreadRun.p99, 0),
      fmt(t.spreadRun.rssMb, 0),
    );
    row(
      'one tenant again',
      fmt(t.singleAfter.rps, 0),
      fmt(t.singleAfter.p99, 0),
      fmt(t.singleAfter.rssMb, 0),
    );
    row('throughput ratio spread/one', fmt(t.ratio, 2));
    // The server's CPU per call, all threads / main thread: one tenant, then spread.
    for (const [name, run] of [
      ['one tenant', t.single],
      ['spread', t.spreadRun],
    ] as const) {
      row(
        `${name}: server CPU/call, all / main ms`,
        `${fmt(run.cpuMsPerCall, 2)} / ${fmt(run.mainThreadMsPerCall, 2)}`,
      );
    }
  }
  if (r.rotation) {
    const t = r.rotation;
    lines.push('', '4. Rotation');
    if (t.available) {
      row('', 'records/s', 'ratio');
      row(
        'store invocation records (16 in flight, context)',
        fmt(t.storePerSec ?? Number.NaN, 0),
        '',
      );
      row(
        `raw AES-256-GCM decrypt+encrypt (${t.records} records)`,
        fmt(t.rawPerSec ?? Number.NaN, 0),
        '1.0',
      );
      row(
        'rewrap job (scheduled rotation: record keys)',
        fmt(t.rewrapPerSec ?? Number.NaN, 0),
        fmt(t.rewrapRatio ?? Number.NaN, 2),
      );
      row(
        're-seal job (emergency rotation, context)',
        fmt(t.resealPerSec ?? Number.NaN, 0),
        fmt(t.resealRatio ?? Number.NaN, 2),
      );
    } else {
      lines.push(`  rewrap: not available yet (${t.reason})`);
    }
    const h = t.hookP99;
    lines.push(
      h
        ? `  hook p99 at ${h.rate} req/s: ${fmt(h.rewrapping, 0)} ms during a rewrap vs ${fmt(h.idle, 0)} ms idle (job ${h.jobStatus}, ${h.jobDone}/${h.jobTotal} records in ${fmt(h.jobSec)} s of a ${h.windowSec} s window)`
        : `  hook p99 during a rewrap vs idle: not available (${t.hookReason ?? ''})`,
    );
  }
  const { ratios: rt, targets } = ratios(r);
  // One more digit than the tables above: 0.498 must not read as a met 0.50.
  lines.push('', 'Targets (issue 6)');
  row(
    `e2e throughput ES384 >= ${TARGETS.e2eThroughputRatio}`,
    fmt(rt.e2eThroughputES384 ?? Number.NaN, 3),
    met(targets.e2eThroughputES384),
  );
  row(
    `e2e throughput RS384 >= ${TARGETS.e2eThroughputRatio}`,
    fmt(rt.e2eThroughputRS384 ?? Number.NaN, 3),
    met(targets.e2eThroughputRS384),
  );
  row(
    `p99 at half max rate < ${TARGETS.p99AtHalfRateMs} ms`,
    fmt(rt.p99AtHalfRateMs ?? Number.NaN, 0),
    met(targets.p99AtHalfRate),
  );
  row(
    `engine vs fhirpath.js >= ${TARGETS.engineSpeedup}x`,
    fmt(rt.engineVsFhirpath ?? Number.NaN, 2),
    met(targets.engineVsFhirpath),
  );
  row(
    `tenant spread >= ${TARGETS.tenantSpreadRatio}`,
    fmt(rt.tenantSpread ?? Number.NaN, 3),
    met(targets.tenantSpread),
  );
  row(
    `rewrap vs raw AES-GCM >= ${TARGETS.rewrapRatio}`,
    fmt(rt.rewrapVsRawAesGcm ?? Number.NaN, 3),
    met(targets.rewrapVsRawAesGcm),
  );
  process.stdout.write(`${lines.join('\n')}\n\n`);
}

async function main(): Promise<void> {
  const started = performance.now();
  const { mode, sections, algs } = parseArgs(process.argv.slice(2));
  const s = SETTINGS[mode];
  const { raw, compiled } = loadShippedPack();
  const report: Report = {};
  if (sections.includes('engine')) {
    log('2. rule engine');
    const patients = loadPatients(
      s.enginePatients !== undefined ? { limit: s.enginePatients } : {},
    );
    report.engine = await runEngineSection(compiled, patients, s.engineMinMs);
  }
  const e2ePatients = loadPatients({ names: E2E_PATIENTS.slice(0, s.e2ePatients) });
  const loadOpts = {
    packRaw: raw,
    pack: compiled,
    patients: e2ePatients,
    connections: s.connections,
    durationSec: s.durationSec,
    warmupSec: s.warmupSec,
    log,
  };
  if (sections.includes('e2e')) {
    log('1. end to end');
    report.e2e = await runE2eSection({
      ...loadOpts,
      algs: algs ?? s.algs,
      rotationProbe: sections.includes('rotation'),
    });
  }
  if (sections.includes('tenants')) {
    log('3. tenants at scale');
    report.tenants = await runTenantsSection({ ...loadOpts, tenants: s.tenants, spread: s.spread });
  }
  if (sections.includes('rotation')) {
    log('4. rotation');
    report.rotation = await runRotationSection({ ...loadOpts, records: s.rotationRecords });
    const probe = report.e2e?.rotation;
    if (probe) {
      report.rotation.hookP99 = {
        rate: probe.rate,
        idle: probe.idle.p99,
        rewrapping: probe.rewrapping.p99,
        jobDone: probe.jobDone,
        jobTotal: probe.jobTotal,
        jobStatus: probe.jobStatus,
        jobSec: probe.jobSec,
        windowSec: probe.windowSec,
      };
      delete report.rotation.hookReason;
    } else {
      report.rotation.hookReason = 'needs the end-to-end section (--sections=e2e,rotation)';
    }
  }
  printTable(mode, report);
  const { ratios: headline, targets } = ratios(report);
  const json = {
    bench: 'cellcds',
    mode,
    ratios: headline,
    targets,
    ...report,
    machine: {
      node: process.version,
      cores: os.availableParallelism(),
      platform: process.platform,
    },
    durationSec: (performance.now() - started) / 1000,
  };
  process.stdout.write(`${JSON.stringify(json)}\n`);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    const msg = err instanceof Error ? err.message : String(err);
    process.stderr.write(`\nBENCH FAILED: ${msg}\n`);
    if (!(err instanceof BenchFailure) && err instanceof Error && err.stack) {
      process.stderr.write(`${err.stack}\n`);
    }
    process.exit(1);
  },
);
