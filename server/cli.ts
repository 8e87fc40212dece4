/**
 * `cellcds`: the command line. Admin commands call the same AdminService the admin API uses
 * (on the local data directory, as a local platform operator); `pack` commands work offline;
 * `call` and `pack push` talk to a running server over HTTP.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import jose from 'node-jose';
import {
  createEvaluator,
  nowProblem,
  PackValidationError,
  parseNow,
  parsePackText,
  runPackTests,
  testInput,
  validatePack,
} from '../rules/index.ts';
import type {
  CompiledPack,
  EvaluationResult,
  Evaluator,
  PackProblem,
  PackTestRequest,
  RawCard,
  RulePack,
} from '../rules/index.ts';
import {
  ControlPlaneCopyError,
  copyControlPlane,
  CONTROL_PLANE_SCHEMA_PATTERN,
  COPIED_TABLES,
  createLocalKeyProvider,
  DEFAULT_CONTROL_PLANE_SCHEMA,
  InvalidInputError,
  ResidencyError,
  TENANT_ID_PATTERN,
} from '../tenants/index.ts';
import type {
  ChainHead,
  ControlPlane,
  FeedbackSummary,
  Principal,
  PurgeResult,
  Tenant,
} from '../tenants/index.ts';
import {
  actorOf,
  AdminService,
  canaryPercentMessage,
  MAX_CANARY_PERCENT,
  UPLOAD_TEST_DEFAULTS,
} from './admin-service.ts';
import {
  anchorsOfFile,
  CONTROL_PLANE_CHAIN,
  controlPlaneAuditHead,
  controlPlaneChain,
  MAX_ANCHORS,
  parseAnchor,
  tenantChain,
  verifyControlPlaneAudit,
} from './audit-anchors.ts';
import { formatBackupTable, listBackups } from './backup-list.ts';
import { DataAdmin } from './data-admin.ts';
import {
  buildDeps,
  ensureDataDir,
  openConfiguredControlPlane,
  readAdminToken,
} from './bootstrap.ts';
import { ConfigError, loadConfig } from './config.ts';
import type { Config } from './config.ts';
import { daysBetween, shiftDates } from './date-shift.ts';
import { ServiceError } from './errors.ts';
import {
  DEMO_ISSUER,
  DEMO_KEY_FILE,
  DEMO_TENANT,
  readPackFile,
  SHIPPED_PACK_FILE,
} from './demo.ts';
import { buildEvidence, EvidenceInputError, writeEvidence } from './evidence.ts';
import type { TenantAuditEventLike } from './evidence.ts';
import { createLogger } from './logger.ts';
import { runMigration } from './migrate.ts';
import { retentionCutoff } from './retention.ts';
import { describeRegion, formatRegionTable, loadRegionMatrix } from './regions.ts';
import type { RegionMatrix } from './regions.ts';
import { runServe } from './main.ts';
import { textTable } from './text-table.ts';

const LOCAL_OPERATOR: Principal = { tokenId: 'cli', role: 'platform-operator' };

/** Exit codes: 0 ok, 1 failure (tests failed, call refused), 2 bad usage or configuration. */
class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
  ) {
    super(message);
  }
}

let unknownSettingsWarned = false;

function config(): Config {
  try {
    const cfg = loadConfig();
    if (!unknownSettingsWarned) {
      unknownSettingsWarned = true;
      // A mistyped setting would otherwise be ignored in silence (names only, never values).
      for (const u of cfg.unknownSettings) {
        process.stderr.write(
          `warning: ${u.name} is not a cellcds setting and is ignored${u.suggestion !== undefined ? ` (did you mean ${u.suggestion}?)` : ''}\n`,
        );
      }
    }
    return cfg;
  } catch (err) {
    if (err instanceof ConfigError) {
      throw new CliError(err.message, 2);
    }
    throw err;
  }
}

function out(value: unknown): void {
  process.stdout.write(`${typeof value === 'string' ? value : JSON.stringify(value, null, 2)}\n`);
}

/** The region matrix of this configuration; a bad file is a usage error (exit 2). */
function regionMatrix(cfg: Config): RegionMatrix {
  try {
    return loadRegionMatrix(cfg.regionsFile, { dataDir: cfg.dataDir, publicUrl: cfg.publicUrl });
  } catch (err) {
    throw err instanceof ConfigError ? new CliError(err.message, 2) : err;
  }
}

/**
 * The default data directory is `./var` of the current folder: run elsewhere, a local command
 * would create a new, empty installation there that no server reads. Refused instead (an
 * explicit CELLCDS_DATA_DIR is taken as meant).
 */
function assertDataDirHere(cfg: Config): void {
  if (!cfg.dataDirSet && !fs.existsSync(cfg.dataDir)) {
    throw new CliError(
      `no cellcds data directory at ${cfg.dataDir} (the default, ./var of the current folder): ` +
        'run cellcds in the folder the server runs in, or set CELLCDS_DATA_DIR to its data directory',
      2,
    );
  }
}

/** Says where a server was looked for, and how to point the CLI at another one. */
function unreachable(url: string, err: unknown): CliError {
  return new CliError(
    `cannot reach ${url}: ${err instanceof Error ? err.message : String(err)} (is the server running? npm start. ` +
      'One on another port or host: set PORT or CELLCDS_PUBLIC_URL as the server has them, or pass --url)',
  );
}

/**
 * Input the admin service refused as invalid (a bad id, URL, key set, role, lifetime, version,
 * canary, filter: InvalidInputError, or a 400/422 ServiceError naming what to fix) is a usage
 * error, exit 2, with its message unchanged. A failed operation keeps exit 1: not found,
 * conflict (an id in use), a residency policy refusal, a database error.
 */
function usageErrorOf(err: unknown): unknown {
  if (err instanceof InvalidInputError) {
    return new CliError(err.message, 2);
  }
  if (err instanceof ServiceError && (err.status === 400 || err.status === 422)) {
    return new CliError(err.message, 2);
  }
  return err;
}

/** Runs an admin operation on the local data directory. */
async function withLocal<T>(fn: (admin: AdminService) => Promise<T>): Promise<T> {
  return withLocalControlPlane(async (controlPlane) => {
    const matrix = regionMatrix(config());
    const evaluator = createEvaluator(config().evaluation);
    try {
      return await fn(new AdminService({ controlPlane, evaluator, regions: matrix.regions }));
    } finally {
      await evaluator.close();
    }
  });
}

/**
 * Runs an operation on the local control plane only: no region's keyring or stores are
 * opened, so a command run on a host whose keyProvider.dir is wrong cannot make a keyring or
 * bind a region to it (only the server does, on the region's real keyring).
 */
async function withLocalControlPlane<T>(
  fn: (controlPlane: ControlPlane) => Promise<T>,
): Promise<T> {
  const cfg = config();
  assertDataDirHere(cfg);
  ensureDataDir(cfg.dataDir);
  const controlPlane = await openConfiguredControlPlane(cfg);
  try {
    return await fn(controlPlane).catch((err: unknown) => {
      throw usageErrorOf(err);
    });
  } finally {
    await controlPlane.close();
  }
}

/** `--retention-days`/`--days`: digits as a number; anything else as given (refused, exit 2). */
function retentionDaysArg(value: string): number | string {
  return /^[0-9]{1,9}$/.test(value) ? Number(value) : value;
}

/**
 * `records purge`: one tenant's records past its retention period, purged in the local data
 * directory's region (the server's purge batches and this one's take turns on the store).
 * Progress goes to stderr at most once a second; the result (counts, cutoff) to stdout.
 */
async function purgeTenantRecords(o: {
  tenant: string;
  dryRun?: boolean;
  batchSize?: string;
}): Promise<PurgeResult> {
  if (!TENANT_ID_PATTERN.test(o.tenant)) {
    throw new CliError(`--tenant must be a tenant id (${TENANT_ID_PATTERN.source})`, 2);
  }
  const batchSize = o.batchSize === undefined ? undefined : Number(o.batchSize);
  if (
    batchSize !== undefined &&
    (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1000)
  ) {
    throw new CliError('--batch-size must be a whole number from 1 to 1000', 2);
  }
  const cfg = config();
  assertDataDirHere(cfg);
  const deps = await buildDeps(cfg, createLogger({ level: 'silent' }), {
    resumeJobs: false,
    operator: true,
  });
  try {
    const tenant = await deps.controlPlane.tenants.get(o.tenant);
    const days = tenant.retention?.recordDays;
    if (days === undefined) {
      throw new CliError(
        `tenant ${o.tenant} has no retention period (its records are kept forever): set one with cellcds tenant retention ${o.tenant} --days N`,
        2,
      );
    }
    if (!(await deps.stores.listTenants()).includes(o.tenant)) {
      throw new CliError(`tenant ${o.tenant} has no store in region ${deps.region.id}`);
    }
    let shown = 0;
    const result = await deps.stores.store(o.tenant).purgeRecords({
      before: retentionCutoff(deps.now(), days),
      retentionDays: days,
      actor: actorOf(LOCAL_OPERATOR),
      ...(o.dryRun === true ? { dryRun: true } : {}),
      ...(batchSize !== undefined ? { batchSize } : {}),
      onProgress: (p) => {
        if (performance.now() - shown >= 1000) {
          shown = performance.now();
          process.stderr.write(
            `purged ${String(p.invocations)} invocation records and ${String(p.feedback)} feedback so far (${String(p.batches)} batches)\n`,
          );
        }
      },
    });
    if (result.skipped) {
      throw new CliError(
        `tenant ${o.tenant} is being purged by another process (the server): try again later`,
      );
    }
    return result;
  } finally {
    await deps.close();
  }
}

/**
 * `feedback summary`: a tenant's override-rate report. Through a running server with `--url` or
 * `--token` (GET /admin/tenants/{id}/feedback/summary); else on the local data directory's
 * region, as a local platform operator, as `records purge` does. Either way audited
 * `feedback.summary`; it reads clear columns only (no record opened, no key used).
 */
async function feedbackSummaryOf(
  o: ServerOpts & { tenant: string; since?: string; until?: string },
): Promise<FeedbackSummary> {
  if (!TENANT_ID_PATTERN.test(o.tenant)) {
    throw new CliError(`--tenant must be a tenant id (${TENANT_ID_PATTERN.source})`, 2);
  }
  const window = {
    ...(o.since !== undefined ? { since: o.since } : {}),
    ...(o.until !== undefined ? { until: o.until } : {}),
  };
  if (o.url !== undefined || o.token !== undefined) {
    const query = new URLSearchParams(window).toString();
    return expectStatus(
      await adminCall(
        o,
        'GET',
        `/admin/tenants/${encodeURIComponent(o.tenant)}/feedback/summary${query ? `?${query}` : ''}`,
      ),
      200,
    ) as unknown as FeedbackSummary;
  }
  const cfg = config();
  assertDataDirHere(cfg);
  const deps = await buildDeps(cfg, createLogger({ level: 'silent' }), {
    resumeJobs: false,
    operator: true,
  });
  try {
    return await DataAdmin.of(deps)
      .feedbackSummary(LOCAL_OPERATOR, o.tenant, window)
      .catch((err: unknown) => {
        throw usageErrorOf(err);
      });
  } finally {
    await deps.close();
  }
}

/** The override-rate report as a table: one line per pack, version and rule, then its reasons. */
function formatFeedbackSummary(summary: FeedbackSummary): string {
  const head = `tenant ${summary.tenant}, cards shown from ${summary.since} to ${summary.until}`;
  if (summary.rows.length === 0) {
    return `${head}
no cards shown in this window`;
  }
  const rate = (r: number | null) => (r === null ? '-' : `${(r * 100).toFixed(1)}%`);
  const rows = summary.rows.map((r) => [
    r.packId,
    r.packVersion,
    r.ruleId ?? 'unknown',
    String(r.shown),
    String(r.accepted),
    String(r.overridden),
    rate(r.overrideRate),
  ]);
  const header = ['PACK', 'VERSION', 'RULE', 'SHOWN', 'ACCEPTED', 'OVERRIDDEN', 'OVERRIDE RATE'];
  const lines: string[] = [head, ''];
  textTable(header, rows, { right: new Set([3, 4, 5, 6]) }).forEach((line, k) => {
    lines.push(line);
    const reasons = k === 0 ? [] : Object.entries(summary.rows[k - 1]?.reasons ?? {});
    for (const [code, n] of reasons.sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))) {
      lines.push(`    overridden: ${code}  ${String(n)}`);
    }
  });
  return lines.join('\n');
}

function readJsonFile(file: string): unknown {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
  } catch (err) {
    throw new CliError(`${file}: ${err instanceof Error ? err.message : String(err)}`, 2);
  }
}

const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

// ---------------------------------------------------------------------------- pack commands

/**
 * The tests' budgets as the server's upload tests have them: the upload call budget (compiling
 * counts in the first call) and the configured live rule budget (CELLCDS_RULE_BUDGET_MS), so
 * `pack test` says what an upload will.
 */
function uploadTestBudgets(): { callBudgetMs: number; ruleBudgetMs: number } {
  return {
    callBudgetMs: UPLOAD_TEST_DEFAULTS.callBudgetMs,
    ruleBudgetMs: config().evaluation.ruleBudgetMs,
  };
}

/**
 * The pack file as written, its test files not read yet: validatePack reads them (baseDir) and
 * lists a test file it cannot use with every other problem of the pack, in one run.
 */
function readPackAsWritten(file: string): unknown {
  return parsePackText(fs.readFileSync(file, 'utf8'), /\.ya?ml$/i.test(file) ? 'yaml' : 'json');
}

async function loadAndValidate(
  file: string,
  runTests: boolean,
): Promise<{ compiled: CompiledPack; raw: unknown }> {
  if (!fs.existsSync(file)) {
    throw new CliError(`${file}: no such file`, 2);
  }
  const raw = readPackAsWritten(file);
  const evaluator = createEvaluator(
    runTests ? uploadTestBudgets() : { callBudgetMs: UPLOAD_TEST_DEFAULTS.callBudgetMs },
  );
  try {
    await evaluator.ready();
    const compiled = await validatePack(raw, {
      runTests,
      evaluator,
      baseDir: path.dirname(file),
      // Passing tests are then held to the live call budget, as an upload's are; a test over
      // half of it is a warning, as in an upload's answer.
      ...(runTests
        ? {
            liveCallBudgetMs: config().evaluation.callBudgetMs,
            // Every rule must fire in a test, as an upload requires (CELLCDS_PACK_TEST_COVERAGE).
            requireCoverage: config().packCheck.requireTestCoverage,
            onWarning: (w: string) => process.stderr.write(`warning: ${w}\n`),
          }
        : {}),
    });
    return { compiled, raw };
  } finally {
    await evaluator.close();
  }
}

function printProblems(file: string, err: PackValidationError): void {
  // Every problem found is counted; only those the error kept are listed (YAML syntax errors
  // stop at the first few), and the line saying so is not one of them.
  const left = err.total - err.problems.length;
  process.stderr.write(
    `${file}: ${err.total} problem(s)${left > 0 ? `, first ${err.problems.length} shown` : ''}\n`,
  );
  for (const p of err.problems) {
    process.stderr.write(`  ${p.path}: ${p.message}\n`);
  }
  if (left > 0) {
    process.stderr.write(
      `  ... and ${left} more not shown (fix the first and check again: later ones often follow from it)\n`,
    );
  }
}

async function packValidate(file: string): Promise<void> {
  try {
    const { compiled } = await loadAndValidate(file, true);
    out(
      `ok ${compiled.id}@${compiled.version} sha256:${compiled.hash} (${compiled.pack.rules.length} rules, ${compiled.pack.tests?.length ?? 0} tests passed)`,
    );
  } catch (err) {
    if (err instanceof PackValidationError) {
      printProblems(file, err);
      throw new CliError('pack is invalid');
    }
    throw err;
  }
}

async function packTest(file: string): Promise<void> {
  let compiled: CompiledPack;
  try {
    compiled = (await loadAndValidate(file, false)).compiled;
  } catch (err) {
    if (err instanceof PackValidationError) {
      printProblems(file, err);
      throw new CliError('pack is invalid');
    }
    throw err;
  }
  const evaluator = createEvaluator(uploadTestBudgets());
  try {
    await evaluator.ready();
    // Passing tests are then held to the live call budget (CELLCDS_EVAL_BUDGET_MS), as an upload's are.
    let uncovered: PackProblem[] = [];
    const results = await runPackTests(compiled, evaluator, {
      liveCallBudgetMs: config().evaluation.callBudgetMs,
      // Every rule must fire in a test, as an upload requires (CELLCDS_PACK_TEST_COVERAGE).
      ...(config().packCheck.requireTestCoverage
        ? { onUncovered: (u: PackProblem[]) => (uncovered = u) }
        : {}),
    });
    const width = Math.max(4, ...results.map((r) => r.name.length));
    out(`${'test'.padEnd(width)}  result`);
    for (const r of results) {
      out(`${r.name.padEnd(width)}  ${r.passed ? 'pass' : 'FAIL'}`);
      if (!r.passed) {
        for (const f of r.failures) {
          out(`${' '.repeat(width)}    ${f}`);
        }
        const explained = await explainTest(compiled, evaluator, results.indexOf(r));
        for (const t of explained?.trace ?? r.trace) {
          out(
            `${' '.repeat(width)}    trace ${t.ruleId}: ${t.status}${t.error ? ` (${t.error})` : ''} ${t.durationMs.toFixed(1)} ms`,
          );
          if (t.firstFalse) {
            const f = t.firstFalse;
            out(
              `${' '.repeat(width)}      first false: operand ${f.operand} of ${f.of} '${f.expression}' is ${f.result}`,
            );
          }
        }
        for (const l of explained?.lets ?? []) {
          out(
            `${' '.repeat(width)}    let ${l.name}: ${l.value ?? `${l.status}${l.error ? ` (${l.error})` : ''}`}`,
          );
        }
      }
    }
    for (const w of results.flatMap((r) => r.warnings ?? [])) {
      process.stderr.write(`warning: ${w}\n`);
    }
    const failed = results.filter((r) => !r.passed).length;
    out(`${results.length - failed} passed, ${failed} failed`);
    for (const p of uncovered) {
      out(`${p.path}: ${p.message}`);
    }
    if (failed > 0) {
      throw new CliError(`${failed} pack test(s) failed`);
    }
    if (uncovered.length > 0) {
      const n = uncovered.filter((p) => p.path !== 'tests').length;
      throw new CliError(`${n} rule(s) fire in none of the pack's tests`);
    }
  } finally {
    await evaluator.close();
  }
}

/**
 * A failing test run again with the let values summarized (EvaluateOptions.traceValues), so the
 * author sees which step came out empty; undefined if the test did not get to evaluate.
 */
async function explainTest(
  compiled: CompiledPack,
  evaluator: Evaluator,
  index: number,
): Promise<EvaluationResult | undefined> {
  const test = compiled.pack.tests?.[index];
  // The input the test ran with (the same hookInstance); none if it could not run.
  const input = test === undefined ? undefined : testInput(compiled, test);
  if (test === undefined || input === undefined || typeof input === 'string') {
    return undefined;
  }
  return evaluator.evaluate(compiled, test.service, input, { traceValues: true });
}

async function packEval(
  file: string,
  opts: { request: string; service?: string; now?: string; trace?: boolean },
): Promise<void> {
  const { compiled } = await loadAndValidate(file, false).catch((err: unknown) => {
    if (err instanceof PackValidationError) {
      printProblems(file, err);
      throw new CliError('pack is invalid');
    }
    throw err;
  });
  // Read exactly as a pack test's `now` (one function for both): a date alone is 00:00 UTC of
  // that day; a time needs its offset (without one it would be read in this machine's time
  // zone); a text that is no date is refused (every rule reading it would fail).
  const nowWrong = opts.now === undefined ? undefined : nowProblem(opts.now);
  if (nowWrong !== undefined) {
    throw new CliError(
      `--now must be an instant with its offset (2020-03-15T12:00:00Z) or a date only (2020-03-15, read as 00:00 UTC), not ${String(opts.now)}: ${nowWrong}`,
      2,
    );
  }
  const request = readJsonFile(opts.request) as PackTestRequest;
  const service = opts.service ?? compiled.pack.services.find((s) => s.hook === request.hook)?.id;
  if (!service) {
    throw new CliError(`no service in ${compiled.id} for hook ${request.hook}; pass --service`, 2);
  }
  // A key the request lacks reaches the rules as no data at all, which reads like "the
  // patient has none": say so, since the server would have fetched it from the FHIR server.
  const declared = Object.keys(
    compiled.pack.services.find((s) => s.id === service)?.prefetch ?? {},
  );
  const given = request.prefetch ?? {};
  const missing = declared.filter((key) => !Object.hasOwn(given, key));
  if (missing.length > 0) {
    process.stderr.write(
      `warning: the request has no prefetch for ${missing.map((k) => `'${k}'`).join(', ')} of service ${service}: ` +
        'rules reading it see no data (a server would fetch it from the EHR FHIR server)\n',
    );
  }
  const evaluator = createEvaluator();
  try {
    // Worker start-up must not eat into the call's evaluation budget.
    await evaluator.ready();
    const result = await evaluator.evaluate(
      compiled,
      service,
      {
        hook: request.hook,
        hookInstance: request.hookInstance ?? crypto.randomUUID(),
        context: request.context,
        prefetch: request.prefetch ?? {},
        now: opts.now === undefined ? new Date() : parseNow(opts.now),
      },
      // The let values (patient data) are for the author's eyes: only with --trace.
      opts.trace === true ? { traceValues: true } : {},
    );
    out(
      opts.trace
        ? { cards: result.cards, trace: result.trace, lets: result.lets ?? [] }
        : { cards: result.cards },
    );
    // Cards missing because a rule failed read like "nothing to say": say so, and fail.
    const failed = result.trace.filter(
      (t) => t.status === 'error' || t.status === 'timeout' || t.status === 'skipped',
    );
    for (const t of failed) {
      process.stderr.write(
        `warning: rule ${t.ruleId}: ${t.status}${t.error ? ` (${t.error})` : ''}\n`,
      );
    }
    if (failed.length > 0) {
      throw new CliError(
        `${failed.length} rule(s) did not complete: the cards above may be missing some (--trace shows every rule)`,
      );
    }
  } finally {
    await evaluator.close();
  }
}

interface ServerOpts {
  url?: string;
  token?: string;
}

/**
 * Calls the admin API of a running server (the data plane belongs to the server process:
 * rotations, backups and restores go through it, never behind its back).
 */
async function adminCall(
  opts: ServerOpts,
  method: string,
  route: string,
  body?: unknown,
): Promise<{ status: number; body: Record<string, unknown>; retryAfterSeconds?: number }> {
  const cfg = config();
  const base = (opts.url ?? cfg.publicUrl).replace(/\/+$/, '');
  const token = opts.token ?? readAdminToken(cfg);
  if (!token) {
    throw new CliError(
      `no operator token: pass --token, set CELLCDS_ADMIN_TOKEN, or run in the server's folder on its host (no admin-token in ${cfg.dataDir})`,
      2,
    );
  }
  let res: Response;
  try {
    res = await fetch(`${base}${route}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  } catch (err) {
    throw unreachable(base, err);
  }
  const parsed = (await res.json().catch(() => ({}))) as Record<string, unknown>;
  // Only a Retry-After in seconds counts (absent, or an HTTP date: no retry).
  const header = res.headers.get('retry-after');
  const retryAfter = header !== null && /^\d+$/.test(header.trim()) ? Number(header) : NaN;
  return {
    status: res.status,
    body: parsed,
    ...(Number.isInteger(retryAfter) && retryAfter >= 0 ? { retryAfterSeconds: retryAfter } : {}),
  };
}

/**
 * Throws a CliError with the server's error code and message unless the status is expected:
 * exit 2 for a 400 (the server found the input invalid, as a local command's usage error), 1
 * for any other refusal or failure.
 */
function expectStatus(
  res: { status: number; body: Record<string, unknown> },
  ...ok: number[]
): Record<string, unknown> {
  if (!ok.includes(res.status)) {
    throw new CliError(
      `server answered ${res.status} ${JSON.stringify(res.body.error ?? '')}: ${JSON.stringify(res.body.message ?? '')}`,
      res.status === 400 ? 2 : 1,
    );
  }
  return res.body;
}

/** Draws a progress bar (done/total, rate, ETA) on stderr until the job ends. */
async function followJob(
  opts: ServerOpts,
  job: Record<string, unknown>,
): Promise<Record<string, unknown>> {
  const tty = process.stderr.isTTY;
  let current = job;
  for (;;) {
    const done = Number(current.done ?? 0);
    const total = Number(current.total ?? 0);
    const width = 30;
    const filled = total > 0 ? Math.round((done / total) * width) : width;
    const eta =
      current.etaSeconds === null || current.etaSeconds === undefined
        ? '-'
        : `${Number(current.etaSeconds).toFixed(0)}s`;
    const line = `${String(current.id)} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${total}  ${Number(current.rate ?? 0).toFixed(0)} rec/s  ETA ${eta}  ${String(current.status)}`;
    process.stderr.write(tty ? `\r${line}` : `${line}\n`);
    if (current.status !== 'running') {
      if (tty) {
        process.stderr.write('\n');
      }
      return current;
    }
    await new Promise((r) => setTimeout(r, 500));
    current = expectStatus(
      await adminCall(opts, 'GET', `/admin/jobs/${encodeURIComponent(String(current.id))}`),
      200,
    );
  }
}

/**
 * The pack as `pack push` uploads it, its test files inline. A test file it cannot use stops
 * the push before anything is sent, and is listed with every other problem of the pack (as
 * `pack validate` lists them, without running the tests).
 */
async function readPackForPush(file: string): Promise<unknown> {
  try {
    return readPackFile(file);
  } catch (err) {
    if (!(err instanceof PackValidationError)) {
      throw err;
    }
    let all = err;
    try {
      await validatePack(readPackAsWritten(file), {
        baseDir: path.dirname(file),
        runTests: false,
      });
    } catch (again) {
      if (!(again instanceof PackValidationError)) {
        throw again;
      }
      all = again;
    }
    printProblems(file, all);
    throw new CliError('pack is invalid');
  }
}

/** `pack subscribers`: who subscribes to a pack, on which version and canary. */
async function packSubscribers(pack: string, opts: ServerOpts): Promise<void> {
  const route = `/admin/rule-packs/${encodeURIComponent(pack)}/subscriptions`;
  out(expectStatus(await adminCall(opts, 'GET', route), 200).subscriptions);
}

interface RolloutOpts extends ServerOpts {
  version: string;
  canaryVersion?: string;
  canaryPercent?: string;
  tenant?: string[];
  all?: boolean;
}

/**
 * `pack rollout`: sets a pack's pinned version (and canary) for the tenants named, or for every
 * tenant subscribed to it (`--all`), one `PUT /admin/tenants/{id}/subscriptions/{pack}` each
 * (each atomic and audited). Stops at the first refusal, saying which tenants were done.
 */
async function packRollout(pack: string, o: RolloutOpts): Promise<void> {
  if ((o.canaryVersion === undefined) !== (o.canaryPercent === undefined)) {
    throw new CliError(
      'a canary needs both --canary-version and --canary-percent (leave both out for none)',
      2,
    );
  }
  const percent = o.canaryPercent === undefined ? undefined : Number(o.canaryPercent);
  if (percent !== undefined && (!Number.isFinite(percent) || percent < 0)) {
    throw new CliError(
      `--canary-percent must be a number from 0 to ${MAX_CANARY_PERCENT}, not ${o.canaryPercent}`,
      2,
    );
  }
  if (percent !== undefined && percent > MAX_CANARY_PERCENT) {
    // A canary at 100 % is a full rollout without the step: nothing is sent.
    throw new CliError(
      `--canary-percent ${o.canaryPercent} ${canaryPercentMessage(o.canaryVersion).replace('PACK', pack)}`,
      2,
    );
  }
  const named = o.tenant ?? [];
  if ((o.all === true) === named.length > 0) {
    throw new CliError(
      'name the tenants (--tenant T, repeatable) or --all (every tenant subscribed to the pack), not both',
      2,
    );
  }
  let tenants = named;
  if (o.all === true) {
    const route = `/admin/rule-packs/${encodeURIComponent(pack)}/subscriptions`;
    const subs = expectStatus(await adminCall(o, 'GET', route), 200).subscriptions;
    tenants = (Array.isArray(subs) ? (subs as Array<{ tenant: string }>) : []).map((s) => s.tenant);
    if (tenants.length === 0) {
      out(`no tenant subscribes to ${pack}: nothing to roll out`);
      return;
    }
  }
  const subscription = {
    version: o.version,
    ...(o.canaryVersion !== undefined && percent !== undefined
      ? { canary: { version: o.canaryVersion, percent } }
      : {}),
  };
  const shown = `${pack}@${o.version}${o.canaryVersion !== undefined ? ` + canary ${o.canaryVersion} at ${String(percent)} %` : ''}`;
  for (const [i, tenant] of tenants.entries()) {
    // existingOnly: a tenant that does not have the pack (or dropped it meanwhile) is refused,
    // never given it, whoever's token this is.
    const route = `/admin/tenants/${encodeURIComponent(tenant)}/subscriptions/${encodeURIComponent(pack)}?existingOnly=true`;
    const res = await adminCall(o, 'PUT', route, subscription);
    if (res.status !== 200) {
      process.stderr.write(
        `${tenant}: refused${i > 0 ? `; done before it: ${tenants.slice(0, i).join(', ')}` : ''}; not done: ${tenants.slice(i).join(', ')}\n`,
      );
      expectStatus(res, 200);
    }
    out(`${tenant}: ${shown}`);
  }
}

async function packPush(file: string, opts: ServerOpts & { wait: string }): Promise<void> {
  const waitSeconds = Number(opts.wait);
  if (!Number.isInteger(waitSeconds) || waitSeconds < 0) {
    throw new CliError(
      `--wait must be a whole number of seconds (0 = do not retry), not ${opts.wait}`,
      2,
    );
  }
  const raw = await readPackForPush(file);
  const giveUpAt = Date.now() + waitSeconds * 1000;
  let answer = await adminCall(opts, 'POST', '/admin/rule-packs', raw);
  // A busy server (its upload slots taken, or its database briefly unavailable) answers 503 with
  // Retry-After; an upload is idempotent (same content: 200 unchanged), so it is sent again.
  while (answer.status === 503 && answer.retryAfterSeconds !== undefined) {
    const delayMs = Math.max(1, answer.retryAfterSeconds) * 1000;
    if (Date.now() + delayMs > giveUpAt) {
      break;
    }
    process.stderr.write(
      `server busy (${JSON.stringify(answer.body.message ?? '')}); retrying in ${delayMs / 1000} s\n`,
    );
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    answer = await adminCall(opts, 'POST', '/admin/rule-packs', raw);
  }
  const { status, body } = answer;
  const res = { status };
  if (res.status === 201 || res.status === 200) {
    out(
      `${res.status === 201 ? 'uploaded' : 'unchanged'} ${String(body.id)}@${String(body.version)} sha256:${String(body.hash)}`,
    );
    for (const w of Array.isArray(body.warnings) ? body.warnings : []) {
      process.stderr.write(`warning: ${String(w)}\n`);
    }
    return;
  }
  if (res.status === 422 && Array.isArray(body.problems)) {
    printProblems(file, new PackValidationError(body.problems as PackValidationError['problems']));
  } else {
    process.stderr.write(
      `${res.status} ${JSON.stringify(body.error ?? '')}: ${JSON.stringify(body.message ?? '')}\n`,
    );
  }
  throw new CliError(
    res.status === 503 && answer.retryAfterSeconds !== undefined
      ? `upload refused (503): the server stayed busy${waitSeconds > 0 ? ` for ${waitSeconds} s` : ''}; try again later, or with a longer --wait`
      : `upload refused (${res.status})`,
  );
}

// ---------------------------------------------------------------------------- call

async function signClientJwt(
  key: jose.JWK.Key,
  iss: string,
  aud: string,
  tenant: string,
): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  const payload = { iss, aud, exp: now + 300, iat: now, jti: crypto.randomUUID(), tenant };
  const result = await jose.JWS.createSign(
    { format: 'compact', fields: { alg: 'ES384', typ: 'JWT', kid: key.kid } },
    key,
  )
    .update(JSON.stringify(payload))
    .final();
  return result as unknown as string;
}

/** The shipped pack's first firing test case for a hook, dates rolled to today. */
function demoRequest(hook: string): { request: PackTestRequest; name: string } {
  const pack = readPackFile(SHIPPED_PACK_FILE) as RulePack;
  const byService = new Map(pack.services.map((s) => [s.id, s.hook]));
  const test = (pack.tests ?? []).find(
    (t) => byService.get(t.service) === hook && t.request && (t.expect.fire?.length ?? 0) > 0,
  );
  if (!test?.request) {
    throw new CliError(`the shipped pack has no demo case for hook ${hook}`, 2);
  }
  const days = test.now ? daysBetween(new Date(test.now), new Date()) : 0;
  const request = shiftDates(test.request, days);
  return { request: { ...request, hook, hookInstance: crypto.randomUUID() }, name: test.name };
}

function printCards(cards: RawCard[]): void {
  if (cards.length === 0) {
    out('No cards.');
    return;
  }
  for (const card of cards) {
    const mark = card.indicator === 'critical' ? '!!' : card.indicator === 'warning' ? '! ' : 'i ';
    out(`${mark} [${card.indicator}] ${card.summary}`);
    if (card.detail) {
      out(
        card.detail
          .split('\n')
          .map((l) => `     ${l}`)
          .join('\n'),
      );
    }
    for (const s of card.suggestions ?? []) {
      out(`     -> suggestion: ${s.label}`);
    }
    out(`     source: ${card.source.label}`);
  }
}

async function call(
  hook: string,
  opts: { demo?: boolean; url?: string; service?: string; request?: string; json?: boolean },
): Promise<void> {
  const cfg = config();
  const base = (opts.url ?? cfg.publicUrl).replace(/\/+$/, '');
  if (!opts.demo) {
    throw new CliError(
      'only --demo signing is built in: pass --demo (uses the demo EHR key in the data directory)',
      2,
    );
  }
  assertDataDirHere(cfg);
  const keyFile = path.join(cfg.dataDir, DEMO_KEY_FILE);
  if (!fs.existsSync(keyFile)) {
    throw new CliError(
      `no demo key at ${keyFile}: start the server once (npm start) to seed the demo`,
      2,
    );
  }
  const key = await jose.JWK.asKey(readJsonFile(keyFile) as object);
  const discoveryUrl = `${base}/cds-services`;
  const disc = await fetch(discoveryUrl, {
    headers: {
      authorization: `Bearer ${await signClientJwt(key, DEMO_ISSUER, discoveryUrl, DEMO_TENANT)}`,
    },
  }).catch((err: unknown) => {
    throw unreachable(discoveryUrl, err);
  });
  if (!disc.ok) {
    // The server never says why a token was refused; its audit trail does, by request id.
    const requestId = disc.headers.get('x-request-id');
    throw new CliError(
      `discovery refused: ${disc.status}` +
        (disc.status === 401
          ? ` (request ${requestId ?? '?'}: npx cellcds audit list --type auth.failure${requestId ? ` --request-id ${requestId}` : ''} shows its reason; a demo tenant suspended, or a data directory other than the server's, are the usual causes)`
          : ''),
    );
  }
  const services = ((await disc.json()) as { services: Array<{ id: string; hook: string }> })
    .services;
  const service = opts.service ?? services.find((s) => s.hook === hook)?.id;
  if (!service) {
    throw new CliError(
      `the demo tenant has no ${hook} service (services: ${services.map((s) => s.id).join(', ')})`,
      2,
    );
  }
  const { request, name } = opts.request
    ? { request: readJsonFile(opts.request) as PackTestRequest, name: opts.request }
    : demoRequest(hook);
  const url = `${base}/cds-services/${service}`;
  const res = await fetch(url, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      authorization: `Bearer ${await signClientJwt(key, DEMO_ISSUER, url, DEMO_TENANT)}`,
    },
    body: JSON.stringify(request),
  });
  const body = (await res.json().catch(() => ({}))) as { cards?: RawCard[] } & Record<
    string,
    unknown
  >;
  if (!res.ok) {
    throw new CliError(`${url} answered ${res.status}: ${JSON.stringify(body)}`);
  }
  if (opts.json) {
    out(body);
    return;
  }
  out(`POST ${url}  (${name})`);
  printCards(body.cards ?? []);
}

// ---------------------------------------------------------------------------- program

export function buildProgram(): Command {
  const program = new Command('cellcds')
    .description('Multi-tenant CDS Hooks 2.0 service with FHIRPath rule packs')
    .showHelpAfterError()
    .exitOverride();

  program
    .command('serve')
    .description('run the service (same as npm start); --region serves one region of the matrix')
    .option('--region <id>', 'the region this process serves (default CELLCDS_REGION)')
    .action(async (o: { region?: string }) =>
      runServe(o.region ? { CELLCDS_REGION: o.region } : {}),
    );

  program
    .command('regions')
    .description('print the region matrix: where data, backups and keys live, per region')
    .option('--json')
    .action((o: { json?: boolean }) => {
      const matrix = regionMatrix(config());
      out(o.json ? matrix.regions.map(describeRegion) : formatRegionTable(matrix));
    });

  program
    .command('migrate')
    .description(
      "move a tenant's home region and its store to another region its policy allows (run on a host with both regions' data and keys, the tenant's planes stopped)",
    )
    .requiredOption('--tenant <id>')
    .requiredOption('--to <region>', 'target region id')
    .option('--state-dir <dir>', 'checkpoint folder (default <target backupDir>/migrations)')
    .option('--json', 'print the result as JSON')
    .action(async (o: { tenant: string; to: string; stateDir?: string; json?: boolean }) => {
      const cfg = config();
      assertDataDirHere(cfg);
      const matrix = regionMatrix(cfg);
      const controlPlane = await openConfiguredControlPlane(cfg);
      try {
        const r = await runMigration({
          controlPlane,
          matrix,
          tenant: o.tenant,
          to: o.to,
          ...(o.stateDir !== undefined ? { stateDir: path.resolve(o.stateDir) } : {}),
          actor: 'cli',
          onProgress: (p) => {
            if (!o.json) {
              process.stderr.write(`migration ${p.id}: ${p.phase}\n`);
            }
          },
        });
        out(
          o.json
            ? r
            : `${r.tenant.id}: ${r.migration.from} -> ${r.migration.to}, ${String(r.migration.verifiedRecords ?? 0)} records verified, source shredded, tenant ${r.tenant.status}`,
        );
      } catch (err) {
        if (err instanceof ResidencyError) {
          throw new CliError(err.message, 1);
        }
        throw err;
      } finally {
        await controlPlane.close();
      }
    });

  // control-plane copy (docs/operations.md, "Scale-out"): SQLite -> PostgreSQL, once.
  program
    .command('control-plane')
    .description('the control-plane database')
    .command('copy')
    .description(
      'copy the SQLite control plane into an empty PostgreSQL schema in one transaction, verified and audited (stop the servers first)',
    )
    .option(
      '--to <url>',
      'postgres:// URL (default CELLCDS_CONTROL_PLANE_URL; prefer it: a URL here shows in ps and shell history)',
    )
    .option(
      '--schema <name>',
      `target schema (default CELLCDS_CONTROL_PLANE_SCHEMA, else ${DEFAULT_CONTROL_PLANE_SCHEMA})`,
    )
    .option('--from <file>', 'source SQLite file (default $CELLCDS_DATA_DIR/control.sqlite)')
    .option('--json', 'print the result as JSON')
    .action(async (o: { to?: string; schema?: string; from?: string; json?: boolean }) => {
      const cfg = config();
      const url = o.to ?? (cfg.controlPlane.kind === 'postgres' ? cfg.controlPlane.url : undefined);
      if (url === undefined) {
        throw new CliError(
          'no target: set CELLCDS_CONTROL_PLANE_URL (or pass --to postgres://...)',
          2,
        );
      }
      const schema = o.schema ?? cfg.controlPlane.schema;
      if (!CONTROL_PLANE_SCHEMA_PATTERN.test(schema)) {
        throw new CliError(
          '--schema: lower-case letters, digits and _, not starting with a digit (at most 63)',
          2,
        );
      }
      const from = path.resolve(o.from ?? path.join(cfg.dataDir, 'control.sqlite'));
      try {
        const r = await copyControlPlane({
          from,
          postgresUrl: url,
          schema,
          statementTimeoutMs: cfg.pg.statementTimeoutMs,
          acquireTimeoutMs: cfg.pg.acquireTimeoutMs,
          actor: 'cli',
          onProgress: (p) => {
            if (!o.json) {
              const rows = p.table ? ` ${p.table} ${String(p.done)}/${String(p.total)}` : '';
              process.stderr.write(`control-plane copy: ${p.phase}${rows}\n`);
            }
          },
        });
        const next = `set CELLCDS_CONTROL_PLANE_URL (and CELLCDS_CONTROL_PLANE_SCHEMA=${r.schema}) on every replica and the CLI, then start them; ${from} is left untouched as the fallback (changes made there from now on are not copied)`;
        if (o.json) {
          out({ ...r, source: from, next });
          return;
        }
        out(`copied ${from} into PostgreSQL schema ${r.schema} (one transaction, verified):`);
        for (const table of COPIED_TABLES) {
          out(`  ${table.padEnd(16)} ${String(r.counts[table])}`);
        }
        out(
          `  audit head       seq ${String(r.sourceHead.seq)} ${r.sourceHead.hash} (as in the source)`,
        );
        out(
          `  then             seq ${String(r.targetHead.seq)} ${r.targetHead.hash} (control-plane.copied)`,
        );
        out(`next: ${next}`);
      } catch (err) {
        if (err instanceof ControlPlaneCopyError) {
          throw new CliError(err.message, 1);
        }
        if (err instanceof InvalidInputError) {
          throw new CliError(
            err.field === 'postgresUrl'
              ? 'the target must be a postgres:// or postgresql:// URL (--to or CELLCDS_CONTROL_PLANE_URL)'
              : err.message,
            2,
          );
        }
        throw err;
      }
    });

  program
    .command('evidence')
    .description('write the auditor evidence report (JSON + Markdown) for a period')
    .requiredOption('--from <dateTime>')
    .requiredOption('--to <dateTime>')
    .option('--out <dir>', 'output folder', '.')
    .action(async (o: { from: string; to: string; out: string }) => {
      const cfg = config();
      assertDataDirHere(cfg);
      // Reads the region's data plane as an operator: refused (exit 1) on a region whose keyring
      // this host lacks or that no server opened yet, with nothing made (server/bootstrap.ts).
      // A missing keyring file is refused first, before the control plane is opened.
      const region = regionMatrix(cfg).regions.find((r) => r.id === cfg.region);
      if (region) {
        await createLocalKeyProvider({
          keyDir: region.keyProvider.dir,
          region: region.id,
          create: false,
        });
      }
      const deps = await buildDeps(cfg, createLogger({ level: 'silent' }), {
        resumeJobs: false,
        operator: true,
      });
      try {
        const storeOf = async (t: Tenant) =>
          t.region === deps.region.id && (await deps.stores.listTenants()).includes(t.id)
            ? deps.stores.store(t.id)
            : undefined;
        const report = await buildEvidence({
          controlPlane: deps.controlPlane,
          matrix: deps.matrix,
          from: o.from,
          to: o.to,
          // Audited (`evidence.report`, the period) before anything is read.
          actor: actorOf(LOCAL_OPERATOR),
          controlPlaneChain: controlPlaneChain(deps.controlPlane.audit),
          chainHead: async (t) => {
            const store = await storeOf(t);
            return store ? store.audit.head() : null;
          },
          tenantEvents: async (t) => {
            const store = await storeOf(t);
            const events: TenantAuditEventLike[] = [];
            for (let afterSeq = 0; store;) {
              const page = await store.audit.list({ afterSeq, limit: 1000 });
              if (page.length === 0) {
                break;
              }
              events.push(...page);
              afterSeq = page.at(-1)?.seq ?? afterSeq;
            }
            return events;
          },
          verifyChain: async (t) => {
            const store = await storeOf(t);
            return store ? store.audit.verify() : null;
          },
          describeKeys: async (r) => {
            if (r.id !== deps.region.id) {
              throw new Error('keys of another region are not held here');
            }
            return deps.keyProvider.describe();
          },
        });
        const files = writeEvidence(report, o.out);
        out(`wrote ${files.json}\nwrote ${files.markdown}`);
      } catch (err) {
        if (err instanceof EvidenceInputError) {
          throw new CliError(err.message, 2);
        }
        throw err;
      } finally {
        await deps.close();
      }
    });

  program
    .command('call')
    .description('sign a hook request like an EHR would, send it, and print the cards')
    .argument('<hook>', 'patient-view | order-select | order-sign')
    .option('--demo', 'sign as the seeded demo EHR and use a demo patient from the shipped pack')
    .option('--url <base>', 'service base URL (default CELLCDS_PUBLIC_URL)')
    .option('--service <id>', 'service id (default: the first service for the hook)')
    .option('--request <file>', 'send this request JSON instead of the demo patient')
    .option('--json', 'print the raw response')
    .action(call);

  const pack = program.command('pack').description('author, test and upload rule packs');
  pack
    .command('validate')
    .argument('<file>')
    .description('validate a pack and run its tests')
    .action(packValidate);
  pack
    .command('test')
    .argument('<file>')
    .description("run the pack's embedded tests; prints a pass/fail table")
    .action(packTest);
  pack
    .command('eval')
    .argument('<file>')
    .requiredOption('--request <file>', 'a CDS Hooks request JSON file')
    .option('--service <id>', 'service id (default: the first service for the request hook)')
    .option(
      '--now <dateTime>',
      "evaluate as of this instant (with its offset), or this date (00:00 UTC), as a test's now",
    )
    .option('--trace', 'print the rule trace too')
    .description('evaluate a pack on a request and print the cards')
    .action(packEval);
  pack
    .command('push')
    .argument('<file>')
    .option('--url <base>', 'server base URL (default CELLCDS_PUBLIC_URL)')
    .option('--token <token>', 'operator token (default CELLCDS_ADMIN_TOKEN or the data dir)')
    .option(
      '--wait <seconds>',
      'while the server answers busy (503 + Retry-After), retry for up to this long (0: never)',
      '120',
    )
    .description('upload a pack version to a running server')
    .action(packPush);

  pack
    .command('subscribers')
    .argument('<pack>')
    .option('--url <base>', 'server base URL (default CELLCDS_PUBLIC_URL)')
    .option('--token <token>', 'rule-author or operator token (default CELLCDS_ADMIN_TOKEN)')
    .description('list the tenants subscribed to a pack: pinned version and canary')
    .action(packSubscribers);
  pack
    .command('rollout')
    .argument('<pack>')
    .requiredOption('--version <semver>', 'the version to pin')
    .option('--canary-version <semver>', 'a canary version beside it')
    .option('--canary-percent <n>', "share of the tenant's calls routed to the canary")
    .option(
      '--tenant <id>',
      'a tenant to roll out to (repeatable)',
      (v: string, prev: string[] | undefined) => [...(prev ?? []), v],
    )
    .option('--all', 'every tenant subscribed to the pack')
    .option('--url <base>', 'server base URL (default CELLCDS_PUBLIC_URL)')
    .option('--token <token>', 'rule-author or operator token (default CELLCDS_ADMIN_TOKEN)')
    .description(
      "move a pack's pinned version (and canary) for tenants already subscribed to it, on a running server",
    )
    .action(packRollout);

  const tenant = program.command('tenant').description('manage tenants (local data directory)');
  tenant
    .command('add')
    .description(
      'register a tenant: its EHR issuer and keys (a JWK Set {"keys":[...]}), FHIR servers, home region',
    )
    .requiredOption('--id <id>')
    .requiredOption('--name <name>')
    .option('--region <region>', 'home region (default CELLCDS_REGION)')
    .requiredOption('--iss <iss>', 'the EHR issuer (JWT iss)')
    .addOption(new Option('--jwks-file <file>', 'public JWK Set file').conflicts('jwksUri'))
    .option('--jwks-uri <url>', 'JWK Set URL')
    .option('--jku <url>', 'allowlisted jku value (repeatable)', collect)
    .option('--fhir-server <url>', 'allowed FHIR server base URL (repeatable)', collect)
    .option('--smart-client-id <id>', "the card viewer's client_id at this tenant's EHR")
    .option(
      '--shared-issuer',
      'the issuer is already registered to another tenant: share it (its EHR must then send the tenant claim in every token)',
    )
    .option(
      '--retention-days <days>',
      'keep invocation records and their feedback this many whole days (1 to 3653), then purge them (default: kept forever)',
    )
    .action(
      async (o: {
        id: string;
        name: string;
        region?: string;
        iss: string;
        jwksFile?: string;
        jwksUri?: string;
        jku?: string[];
        fhirServer?: string[];
        smartClientId?: string;
        sharedIssuer?: boolean;
        retentionDays?: string;
      }) => {
        const issuer: Record<string, unknown> = { iss: o.iss };
        if (o.jwksFile) {
          issuer.jwks = readJsonFile(o.jwksFile);
        }
        if (o.jwksUri) {
          issuer.jwksUri = o.jwksUri;
        }
        if (o.jku) {
          issuer.jku = o.jku;
        }
        const t = await withLocal((a) =>
          a.createTenant(LOCAL_OPERATOR, {
            id: o.id,
            name: o.name,
            region: o.region ?? config().region,
            issuers: [issuer],
            fhirServers: o.fhirServer ?? [],
            ...(o.smartClientId === undefined ? {} : { smart: { clientId: o.smartClientId } }),
            ...(o.sharedIssuer === true ? { sharedIssuer: true } : {}),
            ...(o.retentionDays === undefined
              ? {}
              : { retention: { recordDays: retentionDaysArg(o.retentionDays) } }),
          }),
        );
        out(t);
      },
    );
  tenant
    .command('list')
    .description(
      'list tenants: id, status, home region, name, subscriptions, record retention (retention:<days>d, or retention:forever)',
    )
    .action(async () => {
      const list = await withLocal((a) => a.listTenants(LOCAL_OPERATOR));
      for (const t of list) {
        const retention = t.retention ? `${String(t.retention.recordDays)}d` : 'forever';
        out(
          `${t.id}\t${t.status}\t${t.region}\t${t.name}\t${t.subscriptions.map((s) => `${s.pack}@${s.version}`).join(',')}\tretention:${retention}`,
        );
      }
    });
  tenant
    .command('show')
    .argument('<id>')
    .description(
      'print a tenant (issuers, FHIR servers, subscriptions, residency, retention: absent means records are kept forever)',
    )
    .action(async (id: string) => {
      out(await withLocal((a) => a.getTenant(LOCAL_OPERATOR, id)));
    });
  tenant
    .command('suspend')
    .argument('<id>')
    .description("refuse the tenant's calls (401) until resumed")
    .action(async (id: string) => {
      out(await withLocal((a) => a.setTenantStatus(LOCAL_OPERATOR, id, 'suspended')));
    });
  tenant
    .command('resume')
    .argument('<id>')
    .description("serve a suspended tenant's calls again")
    .action(async (id: string) => {
      out(await withLocal((a) => a.setTenantStatus(LOCAL_OPERATOR, id, 'active')));
    });
  tenant
    .command('subscribe')
    .argument('<id>')
    .requiredOption('--pack <id>')
    .requiredOption('--version <semver>')
    .option('--canary-version <semver>')
    .option('--canary-percent <n>', 'share of calls routed to the canary', Number)
    .description(
      "pin a tenant to a pack version, optionally with a canary (replaces that pack's subscription)",
    )
    .action(
      async (
        id: string,
        o: { pack: string; version: string; canaryVersion?: string; canaryPercent?: number },
      ) => {
        if ((o.canaryVersion === undefined) !== (o.canaryPercent === undefined)) {
          throw new CliError(
            'a canary needs both --canary-version and --canary-percent (leave both out for none)',
            2,
          );
        }
        const t = await withLocal(async (a) => {
          // That pack's entry alone, in one transaction (its other packs untouched).
          await a.setSubscription(LOCAL_OPERATOR, id, o.pack, {
            version: o.version,
            ...(o.canaryVersion
              ? { canary: { version: o.canaryVersion, percent: o.canaryPercent ?? 0 } }
              : {}),
          });
          return a.getTenant(LOCAL_OPERATOR, id);
        });
        out(t.subscriptions);
      },
    );
  tenant
    .command('unsubscribe')
    .argument('<id>')
    .argument('[pack]', 'the pack id to remove (or --pack)')
    .option('--pack <id>')
    .description(
      "remove a pack from a tenant's subscriptions (its services leave the tenant's discovery)",
    )
    .action(async (id: string, packArg: string | undefined, o: { pack?: string }) => {
      if (packArg !== undefined && o.pack !== undefined && packArg !== o.pack) {
        throw new CliError(`two packs named (${packArg} and --pack ${o.pack}): name one`, 2);
      }
      const packId = packArg ?? o.pack;
      if (packId === undefined) {
        throw new CliError(
          'name the pack to remove: cellcds tenant unsubscribe <tenant> <pack> (tenant show lists its subscriptions)',
          2,
        );
      }
      const t = await withLocal(async (a) => {
        const current = await a.getTenant(LOCAL_OPERATOR, id);
        if (!current.subscriptions.some((s) => s.pack === packId)) {
          // Nothing to remove: the arguments are wrong for this tenant (a typo, or the wrong
          // tenant), not a failed operation; nothing is written.
          const subs = current.subscriptions.map((s) => `${s.pack}@${s.version}`).join(', ');
          throw new CliError(
            `tenant ${id} is not subscribed to pack ${packId} (${subs ? `its subscriptions: ${subs}` : 'it has no subscriptions'})`,
            2,
          );
        }
        // In one transaction, audited like subscribe (`admin.tenant.subscriptions`, with the
        // subscriptions left and the pack).
        await a.removeSubscription(LOCAL_OPERATOR, id, packId);
        return a.getTenant(LOCAL_OPERATOR, id);
      });
      out(t.subscriptions);
    });

  tenant
    .command('retention')
    .argument('<id>')
    .option(
      '--days <days>',
      'keep invocation records and their feedback this many whole days (1 to 3653)',
    )
    .option('--forever', 'remove the retention period: records are kept forever (the default)')
    .description(
      "set or remove a tenant's record retention period (older records are purged: hourly by the server, or now with cellcds records purge)",
    )
    .action(async (id: string, o: { days?: string; forever?: boolean }) => {
      if ((o.days === undefined) === (o.forever !== true)) {
        throw new CliError('name one: --days <days> or --forever', 2);
      }
      const retention = o.days === undefined ? null : { recordDays: retentionDaysArg(o.days) };
      const t = await withLocal((a) => a.updateTenant(LOCAL_OPERATOR, id, { retention }));
      out({ tenant: t.id, retention: t.retention ?? 'forever' });
    });

  const records = program
    .command('records')
    .description("a tenant's invocation records (local data directory)");
  records
    .command('purge')
    .description(
      "delete a tenant's invocation records (and their feedback) older than its retention period now, audited as records.purged (the server also does it hourly)",
    )
    .requiredOption('--tenant <id>')
    .option('--dry-run', 'count what would be deleted; delete nothing')
    .option('--batch-size <n>', 'records per transaction (1 to 1000, default 200)')
    .action(async (o: { tenant: string; dryRun?: boolean; batchSize?: string }) => {
      out(await purgeTenantRecords(o));
    });

  program
    .command('feedback')
    .description("a tenant's card feedback")
    .command('summary')
    .description(
      'override rates per rule pack, version and rule over a window (default: the last 30 days): cards shown, accepted, overridden, and overrides per offered reason code; PHI-free, audited as feedback.summary (local data directory, or a running server with --url/--token)',
    )
    .requiredOption('--tenant <id>')
    .option(
      '--since <instant>',
      'cards shown from this ISO 8601 instant (default: until - 30 days)',
    )
    .option('--until <instant>', 'cards shown before this ISO 8601 instant (default: now)')
    .option('--json', 'print the report as JSON')
    .option('--url <base>', 'ask a running server at this base URL')
    .option(
      '--token <token>',
      "admin token for --url: the operator's, or the tenant's tenant-admin or auditor (default CELLCDS_ADMIN_TOKEN)",
    )
    .action(
      async (
        o: ServerOpts & { tenant: string; since?: string; until?: string; json?: boolean },
      ) => {
        const summary = await feedbackSummaryOf(o);
        out(o.json === true ? summary : formatFeedbackSummary(summary));
      },
    );

  const token = program.command('token').description('operator tokens (local data directory)');
  token
    .command('create')
    .requiredOption('--role <role>', 'platform-operator | tenant-admin | rule-author | auditor')
    .option('--tenant <id>', 'for tenant-admin and auditor')
    .option('--label <label>')
    .option('--expires-in-days <days>', 'lifetime in whole days, 1 to 365 (default 90)')
    .description('issue a token; it is printed once and stored only as a hash')
    .action(
      async (o: { role: string; tenant?: string; label?: string; expiresInDays?: string }) => {
        const { expiresInDays, ...rest } = o;
        const input = {
          ...rest,
          ...(expiresInDays !== undefined ? { expiresInDays: Number(expiresInDays) } : {}),
        };
        out(await withLocal((a) => a.issueToken(LOCAL_OPERATOR, input)));
      },
    );
  token
    .command('list')
    .description(
      'list tokens (never secrets): role, tenant, issuer, expiry, revocation, last use (lastUsedAt, to within 5 minutes; absent: no use recorded)',
    )
    .option(
      '--unused-for-days <days>',
      'only live tokens neither used nor issued in the last <days> days (stale: review, revoke)',
    )
    .action(async (o: { unusedForDays?: string }) => {
      // The digits as given: the service refuses anything but a whole number (exit 2).
      const filter = o.unusedForDays !== undefined ? { unusedForDays: o.unusedForDays } : {};
      out(await withLocal((a) => a.listTokens(LOCAL_OPERATOR, filter)));
    });
  token
    .command('revoke')
    .argument('<id>')
    .description('revoke a token and every token it issued')
    .action(async (id: string) => {
      await withLocal((a) => a.revokeToken(LOCAL_OPERATOR, id));
      out(`revoked ${id}`);
    });

  const audit = program.command('audit').description('audit trails');
  audit
    .command('list')
    .description('list control-plane audit events (local data directory)')
    .option('--tenant <id>')
    .option('--type <type>')
    .option('--from <dateTime>')
    .option('--to <dateTime>')
    .option(
      '--request-id <id>',
      'only the events of this request (the X-Request-Id or request id a refusal named)',
    )
    .action(
      async (o: {
        tenant?: string;
        type?: string;
        from?: string;
        to?: string;
        requestId?: string;
      }) => {
        out(await withLocal((a) => a.listAudit(LOCAL_OPERATOR, o)));
      },
    );
  /** `--anchor` values: `SEQ:HASH`, or a file of kept anchors for `chain` (exit 2 if bad). */
  const keptAnchors = (values: readonly string[], chain: string): ChainHead[] => {
    try {
      const kept = values.flatMap((v) =>
        /^[0-9]+:/.test(v) ? [parseAnchor(v)] : anchorsOfFile(readAnchorFile(v), chain, v),
      );
      if (kept.length > MAX_ANCHORS) {
        throw new CliError(`at most ${String(MAX_ANCHORS)} anchors per verification`, 2);
      }
      return kept;
    } catch (err) {
      throw usageErrorOf(err);
    }
  };
  const readAnchorFile = (file: string): string => {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      throw new CliError(
        `--anchor ${file}: neither SEQ:HASH nor a readable file of anchors (${typeof code === 'string' ? code : 'unreadable'})`,
        2,
      );
    }
  };
  audit
    .command('head')
    .description(
      "print an audit chain's head {chain, seq, hash, at} to keep out of the operator's reach (an anchor for `audit verify --anchor`): a tenant's (through the server) or, without --tenant, the control plane's (local)",
    )
    .option('--tenant <id>')
    .option('--url <base>', 'server base URL (default CELLCDS_PUBLIC_URL)')
    .option('--token <token>', 'operator, tenant-admin or auditor token')
    .action(async (o: ServerOpts & { tenant?: string }) => {
      out(
        o.tenant
          ? expectStatus(
              await adminCall(
                o,
                'GET',
                `/admin/tenants/${encodeURIComponent(o.tenant)}/audit/head`,
              ),
              200,
            )
          : await withLocalControlPlane((cp) => controlPlaneAuditHead(cp, LOCAL_OPERATOR)),
      );
    });
  audit
    .command('verify')
    .description(
      "verify a hash-chained audit log: a tenant's (through the server) or, without --tenant, the control plane's (local); with --anchor, also that it still holds heads kept earlier",
    )
    .option('--tenant <id>')
    .option(
      '--anchor <anchor>',
      'a kept head, SEQ:HASH, or a file of them (`audit head` output, a list of those, an evidence report JSON, or SEQ:HASH lines); repeatable',
      collect,
      [],
    )
    .option('--url <base>', 'server base URL (default CELLCDS_PUBLIC_URL)')
    .option('--token <token>', 'operator, tenant-admin or auditor token')
    .action(async (o: ServerOpts & { tenant?: string; anchor: string[] }) => {
      const chain = o.tenant ? tenantChain(o.tenant) : CONTROL_PLANE_CHAIN;
      const kept = keptAnchors(o.anchor, chain);
      const query = kept.map((a) => `anchor=${String(a.seq)}:${a.hash}`).join('&');
      const r = o.tenant
        ? expectStatus(
            await adminCall(
              o,
              'GET',
              `/admin/tenants/${encodeURIComponent(o.tenant)}/audit/verify${query ? `?${query}` : ''}`,
            ),
            200,
          )
        : await withLocalControlPlane((cp) => verifyControlPlaneAudit(cp, LOCAL_OPERATOR, kept));
      out(r);
      const name = o.tenant ? `tenant ${o.tenant}` : 'the control plane';
      if (r.ok !== true) {
        const seq = typeof r.firstBadSeq === 'number' ? String(r.firstBadSeq) : '?';
        throw new CliError(
          r.problem === 'anchor_not_held'
            ? `audit chain of ${name} no longer holds the kept anchor at seq ${seq}: an event at or before seq ${seq} was deleted, edited or reordered and the chain recomputed, or the chain was cut short`
            : `audit chain of ${name} is broken at seq ${seq} (${typeof r.problem === 'string' ? r.problem : 'unknown'})`,
        );
      }
    });

  const keys = program
    .command('keys')
    .description('data keys and master keys (through the running server)');
  keys
    .command('status')
    .description("a tenant's data key versions, wrap counts and running job")
    .requiredOption('--tenant <id>')
    .option('--url <base>')
    .option('--token <token>')
    .action(async (o: ServerOpts & { tenant: string }) => {
      out(
        expectStatus(
          await adminCall(o, 'GET', `/admin/tenants/${encodeURIComponent(o.tenant)}/keys`),
          200,
        ),
      );
    });
  keys
    .command('rotate')
    .description(
      "rotate a tenant's data key: new version primary at once, old records rewrapped in the background",
    )
    .requiredOption('--tenant <id>')
    .option(
      '--emergency',
      'compromised key: rewrap at once, unthrottled, and destroy the old version',
    )
    .option('--wait', 'show progress until the rewrap ends; exit non-zero if it fails')
    .option('--url <base>')
    .option('--token <token>')
    .action(async (o: ServerOpts & { tenant: string; emergency?: boolean; wait?: boolean }) => {
      const job = expectStatus(
        await adminCall(o, 'POST', `/admin/tenants/${encodeURIComponent(o.tenant)}/keys/rotate`, {
          emergency: o.emergency === true,
        }),
        202,
      );
      const end = o.wait ? await followJob(o, job) : job;
      out(end);
      if (o.wait && end.status !== 'done') {
        throw new CliError(
          `rewrap job ${String(end.id)} ended ${String(end.status)}${end.error ? `: ${JSON.stringify(end.error)}` : ''}`,
        );
      }
    });
  keys
    .command('rotate-kek')
    .description(
      "rotate the region's master key: rewraps every tenant's data keys (records untouched)",
    )
    .requiredOption('--region <id>')
    .option('--wait')
    .option('--url <base>')
    .option('--token <token>')
    .action(async (o: ServerOpts & { region: string; wait?: boolean }) => {
      const job = expectStatus(
        await adminCall(o, 'POST', `/admin/regions/${encodeURIComponent(o.region)}/kek/rotate`),
        202,
      );
      const end = o.wait ? await followJob(o, job) : job;
      out(end);
      if (o.wait && end.status !== 'done') {
        throw new CliError(`KEK job ${String(end.id)} ended ${String(end.status)}`);
      }
    });
  program
    .command('job')
    .argument('<id>')
    .option('--wait')
    .option('--url <base>')
    .option('--token <token>')
    .description('show a key job (done/total, rate, ETA)')
    .action(async (id: string, o: ServerOpts & { wait?: boolean }) => {
      const job = expectStatus(
        await adminCall(o, 'GET', `/admin/jobs/${encodeURIComponent(id)}`),
        200,
      );
      out(o.wait ? await followJob(o, job) : job);
    });

  const backup = program
    .command('backup')
    .description(
      "back up a tenant's store (backup --tenant T, through the server), or list the backups (backup list)",
    );
  backup
    .command('list')
    .description(
      "list the backups in this region's backup folder, newest first: name (what restore takes), tenant, time, size, record counts (local; not verified: restore checks them)",
    )
    .option('--tenant <id>', "only this tenant's backups")
    .option('--json', 'print them as JSON')
    .action((o: { tenant?: string; json?: boolean }) => {
      if (o.tenant !== undefined && !TENANT_ID_PATTERN.test(o.tenant)) {
        throw new CliError(`--tenant must be a tenant id (${TENANT_ID_PATTERN.source})`, 2);
      }
      const cfg = config();
      assertDataDirHere(cfg);
      const region = regionMatrix(cfg).regions.find((r) => r.id === cfg.region);
      if (!region) {
        throw new CliError(`CELLCDS_REGION ${cfg.region} is not in the region matrix`, 2);
      }
      const { backups, problems } = listBackups(region.backupDir, {
        ...(o.tenant !== undefined ? { tenant: o.tenant } : {}),
      });
      for (const p of problems) {
        process.stderr.write(`warning: ${p.name} is not listed: ${p.problem}\n`);
      }
      if (o.json) {
        out(backups);
        return;
      }
      if (backups.length === 0) {
        out(
          `no backups${o.tenant !== undefined ? ` of tenant ${o.tenant}` : ''} in ${region.backupDir}`,
        );
        return;
      }
      out(`backups in ${region.backupDir}, newest first:`);
      out(formatBackupTable(backups));
      out('restore one: npx cellcds restore NAME --tenant TENANT');
    });
  // `cellcds backup --tenant T` (the default subcommand), as before `backup list` existed.
  backup
    .command('create', { isDefault: true })
    .description(
      "write a consistent snapshot of a tenant's store (ciphertext + wrapped keys) to the region's backup folder (the default: backup --tenant T)",
    )
    .requiredOption('--tenant <id>')
    .option('--url <base>')
    .option('--token <token>')
    .action(async (o: ServerOpts & { tenant: string }) => {
      out(
        expectStatus(
          await adminCall(o, 'POST', `/admin/tenants/${encodeURIComponent(o.tenant)}/backups`),
          201,
        ),
      );
    });
  program
    .command('restore')
    .argument(
      '<backup>',
      "backup folder (relative to the region's backup folder, or absolute inside it)",
    )
    .option('--tenant <id>', 'refuse unless the backup is of this tenant')
    .option(
      '--allow-unauthenticated',
      'also restore a backup whose manifest cannot be authenticated (format 1, or a crypto-shredded tenant); audited',
    )
    .option('--url <base>')
    .option('--token <token>')
    .description('validate a backup and restore that one tenant (refuses another region or tenant)')
    .action(
      async (
        backup: string,
        o: ServerOpts & { tenant?: string; allowUnauthenticated?: boolean },
      ) => {
        out(
          expectStatus(
            await adminCall(o, 'POST', '/admin/restores', {
              backup,
              ...(o.tenant ? { tenant: o.tenant } : {}),
              ...(o.allowUnauthenticated === true ? { allowUnauthenticated: true } : {}),
            }),
            200,
          ),
        );
      },
    );
  tenant
    .command('failover')
    .argument('<id>')
    .option('--to <region>', 'declare: the standby region that may serve the tenant')
    .option('--clear', 'end the failover: only the home region serves the tenant again')
    .description(
      "declare (or clear) a failover; refused unless the tenant's DR rule and the matrix allow it",
    )
    .action(async (id: string, o: { to?: string; clear?: boolean }) => {
      if (o.clear === (o.to !== undefined)) {
        throw new CliError('pass exactly one of --to REGION and --clear', 2);
      }
      out(
        await withLocal((a) =>
          o.clear
            ? a.clearFailover(LOCAL_OPERATOR, id)
            : a.declareFailover(LOCAL_OPERATOR, id, o.to),
        ),
      );
    });
  tenant
    .command('delete')
    .argument('<id>')
    .description('deprovision: crypto-shred the tenant in this region and retire its id')
    .option('--yes', 'confirm: crypto-shreds the tenant (destroys its keys, then its store)')
    .option('--url <base>')
    .option('--token <token>')
    .action(async (id: string, o: ServerOpts & { yes?: boolean }) => {
      if (!o.yes) {
        throw new CliError(
          'deprovisioning destroys every key of the tenant and cannot be undone: pass --yes',
          2,
        );
      }
      out(
        expectStatus(await adminCall(o, 'DELETE', `/admin/tenants/${encodeURIComponent(id)}`), 200),
      );
    });

  return program;
}

/** Runs the CLI; returns the exit code. */
export async function runCli(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv, { from: 'user' });
    return 0;
  } catch (err) {
    if (err instanceof CliError) {
      process.stderr.write(`cellcds: ${err.message}\n`);
      return err.exitCode;
    }
    if (err instanceof CommanderError) {
      // commander already printed the usage error or the help text.
      return err.exitCode === 0 ? 0 : 2;
    }
    process.stderr.write(`cellcds: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  }
}

const isEntry =
  process.argv[1] !== undefined &&
  path.resolve(process.argv[1]) === path.resolve(import.meta.filename);
if (isEntry) {
  const code = await runCli(process.argv.slice(2));
  if (process.argv[2] !== 'serve' && process.argv[2] !== undefined) {
    process.exit(code);
  } else if (code !== 0) {
    process.exit(code);
  }
}
