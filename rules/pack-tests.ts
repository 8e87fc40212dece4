/**
 * A pack's embedded tests: turning file-based tests into inline requests, and running them.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PackValidationError } from './errors.ts';
import type { Evaluator } from './evaluator.ts';
import { nowProblem, parseNow } from './pack-schema.ts';
import { buildRequestFromRecord, readPatientBundle } from './patient-bundle.ts';
import { isPlanDefinition } from './plan-definition.ts';
import type {
  CompiledPack,
  EvaluationInput,
  EvaluationResult,
  PackProblem,
  PackService,
  PackTest,
  PackTestRequest,
  RawCard,
  TraceEntry,
} from './types.ts';

/** The outcome of one embedded test. */
export interface PackTestResult {
  name: string;
  passed: boolean;
  /** e.g. `expected rule warfarin-nsaid to fire` */
  failures: string[];
  trace: TraceEntry[];
  cards: RawCard[];
  /** True when the test was not run (an earlier one ran out of budget, or time ran out). */
  notRun?: boolean;
  /**
   * With `liveCallBudgetMs`, once every test passed: the time its rules and lets took to
   * evaluate (ms; compiling and parsing the input excluded), the best of the runs measured.
   */
  evaluationMs?: number;
  /** E.g. the test takes more than half the live call budget (the pack is not refused for it). */
  warnings?: string[];
}

/** Limits of {@link runPackTests}; without them every test runs (the local tools). */
export interface RunPackTestsOptions {
  /**
   * Stop at the first test whose evaluation ran out of budget (a rule or let timed out, the
   * call budget ran out, or a worker had to be replaced): that test fails, naming the rule,
   * and the tests after it are not run. For uploads: a pack whose own test overruns is refused
   * anyway, and each further overrun would cost another worker and up to the call budget.
   */
  stopOnBudget?: boolean;
  /** Time for all the tests (ms): a test is not started once it is spent. */
  totalMs?: number;
  /** The clock `totalMs` is measured with (ms). Default `performance.now`. */
  clock?: () => number;
  /**
   * The call budget of live calls (ms; the server's `CELLCDS_EVAL_BUDGET_MS`). The tests run
   * under their evaluator's budget, which may be larger (an upload's tests get 10 s per call:
   * their fresh worker compiles the pack inside the first). Once every test has passed, each
   * test's evaluation time (see {@link evaluationMsOf}) is held to this budget: a test over half
   * of it is run again, up to {@link LIVE_BUDGET_RUNS} runs in all, and the best run counts (a
   * GC pause or a busy host must not refuse a correct pack). The first test whose best run is
   * still over the budget fails (live calls would skip some of its rules on every call), naming
   * the time, the budget and the slowest rules; later tests are not measured. Over half the
   * budget is a warning. The runs again take at most `totalMs` in all (when it is given); a
   * test not measured again keeps its first run's time.
   */
  liveCallBudgetMs?: number;
  /**
   * Test coverage: once the tests have run, called with the pack's rules that fired in none of
   * them ({@link uncoveredRules}: one problem per rule, at `rules[i]`), if there are any. Not
   * called when a test was not run (the pack fails on that already, and the rules it would
   * have fired would be named wrongly). With no tests at all every rule is uncovered (the
   * evaluator is then not used).
   */
  onUncovered?: (problems: PackProblem[]) => void;
}

/** Runs of one test, at most, to measure it against the live call budget (its own run included). */
export const LIVE_BUDGET_RUNS = 4;

/**
 * What a call's rules cost: the sum of its rules' and lets' own durations, as the evaluator
 * measures them. Compiling the pack, parsing the call's input and passing messages between
 * threads are not included (the live workers have the pack compiled ahead).
 */
export function evaluationMsOf(result: EvaluationResult): number {
  let ms = 0;
  for (const t of result.trace) {
    ms += t.durationMs;
  }
  for (const l of result.lets ?? []) {
    ms += l.durationMs;
  }
  return ms;
}

/** The (at most) three slowest rules and lets of a call: ids, titles, durations; no data. */
function slowestSteps(compiled: CompiledPack, result: EvaluationResult): string {
  const titles = new Map(compiled.pack.rules.map((r) => [r.id, r.title]));
  const steps = [
    ...result.trace.map((t) => {
      const title = titles.get(t.ruleId);
      return { label: title ? `${t.ruleId} (${title})` : t.ruleId, ms: t.durationMs };
    }),
    ...(result.lets ?? []).map((l) => ({ label: `let ${l.name}`, ms: l.durationMs })),
  ];
  return steps
    .filter((s) => s.ms >= 0.5)
    .sort((a, b) => b.ms - a.ms)
    .slice(0, 3)
    .map((s) => `${s.label} ${s.ms.toFixed(0)} ms`)
    .join(', ');
}

/** A passed test and what is needed to run it again. */
interface Measured {
  test: PackTest;
  input: EvaluationInput;
  result: PackTestResult;
  first: EvaluationResult;
}

/** See `RunPackTestsOptions.liveCallBudgetMs`. Marks the results it fails or warns about. */
async function holdToLiveBudget(
  compiled: CompiledPack,
  evaluator: Evaluator,
  measured: readonly Measured[],
  liveMs: number,
  until: number,
  clock: () => number,
): Promise<void> {
  for (const m of measured) {
    let best = m.first;
    let bestMs = evaluationMsOf(best);
    let runs = 1;
    while (bestMs > liveMs / 2 && runs < LIVE_BUDGET_RUNS && clock() < until) {
      const again = await evaluator.evaluate(compiled, m.test.service, m.input);
      runs++;
      const ms = evaluationMsOf(again);
      if (ms < bestMs) {
        best = again;
        bestMs = ms;
      }
    }
    m.result.evaluationMs = bestMs;
    if (bestMs <= liveMs / 2) {
      continue;
    }
    const took =
      `test '${m.test.name}' takes ${bestMs.toFixed(0)} ms to evaluate ` +
      `(${runs === 1 ? '1 run' : `best of ${runs} runs`}, compiling excluded)`;
    const slowest = slowestSteps(compiled, best);
    const tail = slowest === '' ? '' : ` Slowest: ${slowest}`;
    if (bestMs > liveMs) {
      m.result.passed = false;
      m.result.failures.push(
        `${took}, over the live call budget of ${liveMs} ms: live calls would skip rules.${tail}`,
      );
      return;
    }
    m.result.warnings = [`${took}, over half the live call budget of ${liveMs} ms.${tail}`];
  }
}

type Json = Record<string, unknown>;

function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function readJsonFile(baseDir: string, file: string): unknown {
  const text = readFileSync(path.resolve(baseDir, file), 'utf8');
  return JSON.parse(text) as unknown;
}

/**
 * Why a test file cannot be used. A missing file names the path looked for: a path written
 * relative to the checkout (`spec/fixtures/...`) is resolved from the pack file's folder.
 */
function errorCode(err: unknown, baseDir: string, file: string): string {
  if (err instanceof SyntaxError) {
    return 'not valid JSON';
  }
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    return code === 'ENOENT'
      ? `file not found (looked for ${path.resolve(baseDir, file)}; paths are relative to the pack file's folder)`
      : code;
  }
  return err instanceof Error ? (err.message.split('\n')[0] ?? 'unreadable') : 'unreadable';
}

/** The part of a CDS Hooks request a pack test keeps (no fhirServer/fhirAuthorization). */
function requestFromFile(raw: unknown): PackTestRequest {
  if (!isObj(raw) || typeof raw.hook !== 'string' || !isObj(raw.context)) {
    throw new Error('not a CDS Hooks request (hook and context required)');
  }
  const out: PackTestRequest = { hook: raw.hook, context: raw.context };
  if (typeof raw.hookInstance === 'string') {
    out.hookInstance = raw.hookInstance;
  }
  if (isObj(raw.prefetch)) {
    out.prefetch = raw.prefetch;
  }
  return out;
}

/** What {@link collectPackFiles} made of a pack's file-based tests. */
export interface CollectedPackFiles {
  /**
   * A copy of the pack with every test whose file could be used inline; a test whose file
   * could not stays file-based, as written (the pack itself when there was nothing to do).
   */
  pack: unknown;
  /** One or more per test whose file cannot be read or used; empty when all could. */
  problems: PackProblem[];
}

/**
 * Returns a copy of the pack in which every file-based test (`requestFile`, `patientBundle`
 * + `draftOrders`) is an inline `request`, read relative to `baseDir`, so that the pack can
 * be uploaded. A PlanDefinition (which carries no tests) is returned as is.
 * @throws PackValidationError naming each test whose file cannot be read or used.
 */
export function resolvePackFiles(raw: unknown, baseDir: string): unknown {
  const { pack, problems } = collectPackFiles(raw, baseDir);
  if (problems.length > 0) {
    throw new PackValidationError(problems);
  }
  return pack;
}

/**
 * As {@link resolvePackFiles}, but returns the problems of the tests whose file cannot be read
 * or used instead of throwing, with the pack resolved as far as it could be: `validatePack`
 * then reports them together with every other problem of the pack, in one run.
 */
export function collectPackFiles(raw: unknown, baseDir: string): CollectedPackFiles {
  if (!isObj(raw) || isPlanDefinition(raw) || !Array.isArray(raw.tests)) {
    return { pack: raw, problems: [] };
  }
  const problems: PackProblem[] = [];
  const services = Array.isArray(raw.services) ? (raw.services as unknown[]).filter(isObj) : [];
  const tests = (raw.tests as unknown[]).map((t, i) => {
    if (!isObj(t)) {
      return t;
    }
    const test: Json = { ...t };
    if (typeof t.requestFile === 'string') {
      try {
        test.request = requestFromFile(readJsonFile(baseDir, t.requestFile));
        delete test.requestFile;
      } catch (err) {
        problems.push({
          path: `tests[${i}].requestFile`,
          message: `cannot use ${t.requestFile}: ${errorCode(err, baseDir, t.requestFile)}`,
        });
      }
    } else if (typeof t.patientBundle === 'string') {
      const service = services.find((s) => s.id === t.service);
      if (!service) {
        problems.push({
          path: `tests[${i}].service`,
          message: `unknown service '${String(t.service)}'`,
        });
        return test;
      }
      try {
        const record = readPatientBundle(readJsonFile(baseDir, t.patientBundle));
        const drafts = Array.isArray(t.draftOrders) ? (t.draftOrders as Json[]) : undefined;
        test.request = buildRequestFromRecord({
          service: service as unknown as PackService,
          record,
          ...(drafts ? { draftOrders: drafts } : {}),
        });
        delete test.patientBundle;
        delete test.draftOrders;
      } catch (err) {
        if (err instanceof PackValidationError) {
          problems.push(
            ...err.problems.map((p) => ({
              path: `tests[${i}]`,
              message: `${p.path}: ${p.message}`,
            })),
          );
        } else {
          problems.push({
            path: `tests[${i}].patientBundle`,
            message: `cannot use ${t.patientBundle}: ${errorCode(err, baseDir, t.patientBundle)}`,
          });
        }
      }
    }
    return test;
  });
  return { pack: { ...raw, tests }, problems };
}

/**
 * The rules of a pack that fired in none of its tests' results (`runPackTests`), each one a
 * problem at `rules[i]`: `rule 'warfarin-nsaid' fires in none of the pack's tests: add a test
 * where it fires`. Firing, not an `expect.fire` naming the rule, is what counts: it proves the
 * rule's condition can be true on some data (an `expect.fire` that passes implies it; a rule
 * that fired in a test without being named counts too). A pack without tests (a PlanDefinition
 * carries none) has every rule uncovered, and one more problem at `tests` says so. This is what
 * keeps a version from switching a safety rule off unnoticed (`when: "%context.patientId =
 * 'nobody'"`, or a rule's only firing test deleted): the version is refused.
 */
export function uncoveredRules(
  compiled: CompiledPack,
  results: readonly PackTestResult[],
): PackProblem[] {
  const fired = new Set<string>();
  for (const r of results) {
    for (const t of r.trace) {
      if (t.status === 'fired') {
        fired.add(t.ruleId);
      }
    }
  }
  const problems: PackProblem[] = [];
  compiled.pack.rules.forEach((rule, i) => {
    if (!fired.has(rule.id)) {
      problems.push({
        path: `rules[${i}]`,
        message: `rule '${rule.id}' fires in none of the pack's tests: add a test where it fires`,
      });
    }
  });
  if (problems.length > 0 && (compiled.pack.tests?.length ?? 0) === 0) {
    problems.push({
      path: 'tests',
      message:
        "the pack has no tests, so none of its rules is shown to fire (a PlanDefinition carries none: write the pack in cellcds's own format, with tests)",
    });
  }
  return problems;
}

/** A stable hookInstance for a test (UUID-shaped), so canary-like logic is reproducible. */
function testHookInstance(hash: string, name: string): string {
  const h = createHash('sha256').update(`${hash}|${name}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

function checkExpectations(test: PackTest, trace: readonly TraceEntry[]): string[] {
  const failures: string[] = [];
  const byId = new Map(trace.map((t) => [t.ruleId, t]));
  const detail = (t: TraceEntry | undefined) =>
    t && (t.status === 'error' || t.status === 'timeout' || t.status === 'skipped')
      ? ` (${t.status}${t.error ? `: ${t.error}` : ''})`
      : '';
  for (const id of test.expect.fire ?? []) {
    const t = byId.get(id);
    if (t?.status !== 'fired') {
      failures.push(`expected rule ${id} to fire${detail(t)}`);
    }
  }
  for (const id of test.expect.notFire ?? []) {
    const t = byId.get(id);
    if (t?.status !== 'not-fired') {
      failures.push(`expected rule ${id} not to fire${t?.status === 'fired' ? '' : detail(t)}`);
    }
  }
  return failures;
}

/** Whether a failure already names rule `id` (an expectation, or an earlier line of ours). */
function names(failures: readonly string[], id: string): boolean {
  return failures.some((f) => f.startsWith(`expected rule ${id} `) || f.startsWith(`rule ${id}:`));
}

/** Statuses of a rule that did not complete on a test's data (`skipped`: see stopOnBudget). */
const FAILED: ReadonlySet<TraceEntry['status']> = new Set(['error', 'timeout']);

/** `rule x: timeout (rule budget exceeded)`: the rule and why, as stopOnBudget names them. */
function unfinishedText(t: TraceEntry): string {
  return `rule ${t.ruleId}: ${t.status}${t.error ? ` (${t.error})` : ''}`;
}

/**
 * A rule that failed or ran out of time on a test's data fails the test, whether or not its
 * expectations name the rule: live, that rule would give no card on such a call (only the
 * "checks could not run" card), so a pack whose tests pass must not carry one
 * (`%meds.authoredOn > @2000-01-01` failed for every patient with two prescriptions while
 * `pack test` said 73 passed). A rule an expectation already names is not named twice. The
 * test format has no way to expect an error: a rule that fails on realistic data is fixed in
 * the rule (`.first()`, `.exists()`, `all()`...), not accepted in its tests.
 */
function unfinishedRules(trace: readonly TraceEntry[], failures: readonly string[]): string[] {
  return trace
    .filter((t) => FAILED.has(t.status) && !names(failures, t.ruleId))
    .map(unfinishedText);
}

const OVER_BUDGET: ReadonlySet<TraceEntry['status']> = new Set(['timeout', 'skipped']);

const failed = (name: string, failures: string[], notRun = false): PackTestResult => ({
  name,
  passed: false,
  failures,
  trace: [],
  cards: [],
  ...(notRun ? { notRun: true } : {}),
});

/**
 * What a test is evaluated with (its request, a hookInstance stable per pack and test, its
 * `now`), or why it cannot run: still file-based, or a `now` that is not one (see `nowProblem`:
 * a time without its offset, or not a date at all).
 */
export function testInput(compiled: CompiledPack, test: PackTest): EvaluationInput | string {
  const request = test.request;
  if (!request) {
    return 'resolve test files before running (requestFile / patientBundle)';
  }
  const nowWrong = test.now === undefined ? undefined : nowProblem(test.now);
  if (nowWrong !== undefined) {
    return `now: ${nowWrong}`;
  }
  return {
    hook: request.hook,
    hookInstance: request.hookInstance ?? testHookInstance(compiled.hash, test.name),
    context: request.context,
    prefetch: request.prefetch ?? {},
    now: test.now !== undefined ? parseNow(test.now) : new Date(),
  };
}

/**
 * Runs a pack's inline tests (call resolvePackFiles first for file-based ones; a test still
 * file-based fails). A test's `now` pins %now (`parseNow`: a date alone is 00:00 UTC; a time
 * must carry an offset, else the test fails); otherwise the current time is used. A rule
 * expected to fire must have status `fired`; one expected not to fire must be `not-fired`; and
 * any rule that errors or times out fails the test, named with its error, whether or not an
 * expectation names it (`unfinishedRules`). `opts` bound the run (uploads); tests left are
 * `notRun` and failed.
 */
export async function runPackTests(
  compiled: CompiledPack,
  evaluator: Evaluator,
  opts: RunPackTestsOptions = {},
): Promise<PackTestResult[]> {
  const clock = opts.clock ?? (() => performance.now());
  const liveMs = opts.liveCallBudgetMs;
  if (liveMs !== undefined && !(liveMs > 0 && Number.isFinite(liveMs))) {
    throw new RangeError('the live call budget must be a positive number of ms');
  }
  const started = clock();
  const results: PackTestResult[] = [];
  const measured: Measured[] = [];
  let stopped: string | undefined;
  for (const test of compiled.pack.tests ?? []) {
    if (stopped === undefined && opts.totalMs !== undefined && clock() - started >= opts.totalMs) {
      stopped = `not run: the tests of one pack may take at most ${opts.totalMs / 1000} s in all`;
    }
    if (stopped !== undefined) {
      results.push(failed(test.name, [stopped], true));
      continue;
    }
    const input = testInput(compiled, test);
    if (typeof input === 'string') {
      results.push(failed(test.name, [input]));
      continue;
    }
    const replacedBefore = evaluator.stats().workersReplaced;
    const result = await evaluator.evaluate(compiled, test.service, input);
    const failures = checkExpectations(test, result.trace);
    failures.push(...unfinishedRules(result.trace, failures));
    if (opts.stopOnBudget === true) {
      const overBudget =
        evaluator.stats().workersReplaced > replacedBefore ||
        result.trace.some((t) => OVER_BUDGET.has(t.status)) ||
        (result.lets ?? []).some((l) => l.status === 'timeout');
      if (overBudget) {
        // Name every rule that did not complete, including those no expectation mentions.
        for (const t of result.trace) {
          if (OVER_BUDGET.has(t.status) && !names(failures, t.ruleId)) {
            failures.push(unfinishedText(t));
          }
        }
        if (failures.length === 0) {
          failures.push('the evaluation ran out of its time budget');
        }
        stopped = 'not run: an earlier test ran out of its time budget';
      }
    }
    const outcome: PackTestResult = {
      name: test.name,
      passed: failures.length === 0,
      failures,
      trace: result.trace,
      cards: result.cards,
    };
    results.push(outcome);
    measured.push({ test, input, result: outcome, first: result });
  }
  if (liveMs !== undefined && results.every((r) => r.passed)) {
    const until = opts.totalMs === undefined ? Infinity : clock() + opts.totalMs;
    await holdToLiveBudget(compiled, evaluator, measured, liveMs, until, clock);
  }
  if (opts.onUncovered && !results.some((r) => r.notRun === true)) {
    const uncovered = uncoveredRules(compiled, results);
    if (uncovered.length > 0) {
      opts.onUncovered(uncovered);
    }
  }
  return results;
}
