/**
 * A pack's embedded tests: turning file-based tests into inline requests, and running them.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PackValidationError } from './errors.ts';
import type { Evaluator } from './evaluator.ts';
import { buildRequestFromRecord, readPatientBundle } from './patient-bundle.ts';
import { isPlanDefinition } from './plan-definition.ts';
import type {
  CompiledPack,
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
}

type Json = Record<string, unknown>;

function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function readJsonFile(baseDir: string, file: string): unknown {
  const text = readFileSync(path.resolve(baseDir, file), 'utf8');
  return JSON.parse(text) as unknown;
}

function errorCode(err: unknown): string {
  if (err instanceof SyntaxError) {
    return 'not valid JSON';
  }
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    return code === 'ENOENT' ? 'file not found' : code;
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

/**
 * Returns a copy of the pack in which every file-based test (`requestFile`, `patientBundle`
 * + `draftOrders`) is an inline `request`, read relative to `baseDir`, so that the pack can
 * be uploaded. A PlanDefinition (which carries no tests) is returned as is.
 * @throws PackValidationError naming each test whose file cannot be read or used.
 */
export function resolvePackFiles(raw: unknown, baseDir: string): unknown {
  if (!isObj(raw) || isPlanDefinition(raw) || !Array.isArray(raw.tests)) {
    return raw;
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
          message: `cannot use ${t.requestFile}: ${errorCode(err)}`,
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
            message: `cannot use ${t.patientBundle}: ${errorCode(err)}`,
          });
        }
      }
    }
    return test;
  });
  if (problems.length > 0) {
    throw new PackValidationError(problems);
  }
  return { ...raw, tests };
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

/**
 * Runs a pack's inline tests (call resolvePackFiles first for file-based ones; a test still
 * file-based fails). A test's `now` pins %now; otherwise the current time is used. A rule
 * expected to fire must have status `fired`; one expected not to fire must be `not-fired`
 * (an error or timeout fails the test either way).
 */
export async function runPackTests(
  compiled: CompiledPack,
  evaluator: Evaluator,
): Promise<PackTestResult[]> {
  const results: PackTestResult[] = [];
  for (const test of compiled.pack.tests ?? []) {
    const request = test.request;
    if (!request) {
      results.push({
        name: test.name,
        passed: false,
        failures: ['resolve test files before running (requestFile / patientBundle)'],
        trace: [],
        cards: [],
      });
      continue;
    }
    const result = await evaluator.evaluate(compiled, test.service, {
      hook: request.hook,
      hookInstance: request.hookInstance ?? testHookInstance(compiled.hash, test.name),
      context: request.context,
      prefetch: request.prefetch ?? {},
      now: test.now !== undefined ? new Date(test.now) : new Date(),
    });
    const failures = checkExpectations(test, result.trace);
    results.push({
      name: test.name,
      passed: failures.length === 0,
      failures,
      trace: result.trace,
      cards: result.cards,
    });
  }
  return results;
}
