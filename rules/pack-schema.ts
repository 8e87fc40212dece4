/**
 * The pack schema (zod, strict objects: an unknown field is a problem with its path) and the
 * translation of zod issues into `PackProblem`s.
 */
import semver from 'semver';
import { z } from 'zod';
import type { PackProblem } from './types.ts';

/** Pack, service and rule ids. */
export const ID_PATTERN = /^[a-z0-9][a-z0-9-]{1,63}$/;
/** `let` and value-set names: usable as `%name` without quoting. */
export const NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;
/** Prefetch keys. */
export const PREFETCH_KEY_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
/** The hooks a pack may serve. */
export const PACK_HOOKS = ['patient-view', 'order-select', 'order-sign'] as const;

const FHIR_DATETIME =
  /^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,9})?)?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))?)?)?)?$/;

const id = (what: string) =>
  z.string().regex(ID_PATTERN, {
    error: `invalid ${what} id (lowercase letters, digits and -, 2 to 64 characters)`,
  });
const text = z.string().min(1, { error: 'must not be empty' });
const hook = z.enum(PACK_HOOKS, { error: `must be one of ${PACK_HOOKS.join(', ')}` });
const name = z.string().regex(NAME_PATTERN, {
  error: 'invalid name (a letter, then letters, digits or _, at most 64 characters)',
});
const dateTime = z.string().regex(FHIR_DATETIME, { error: 'must be a FHIR date or dateTime' });

/**
 * Most embedded tests a pack may carry: an upload runs them all before answering (within its
 * 20 s budget for all tests). 200: every rule must fire in a test (coverage), with the tests
 * that show it silent beside it; the shipped pack's 26 rules took 100 tests.
 */
export const MAX_PACK_TESTS = 200;

/** Why a test's `now` with a time but no offset is refused (also used where tests run). */
export const NOW_OFFSET_MESSAGE =
  'a time needs an offset (Z or +hh:mm), e.g. 2021-03-01T23:00:00Z; or give a date only';

/** Why a `now` that is not a date or dateTime at all is refused. */
export const NOW_FORMAT_MESSAGE = 'must be an ISO 8601 date or dateTime';

/**
 * True for a dateTime with a time of day but no offset (`2021-03-01T23:00`). `Date` reads such
 * a text in the host's time zone, so the instant (and `%today`) would depend on the server;
 * FHIR too requires an offset whenever a time is given. A date alone (`2021-03-01`) is read
 * as midnight UTC by `Date` on every host, so it stays allowed.
 */
export function lacksOffset(value: string): boolean {
  return value.includes('T') && !/(Z|[+-]\d\d:\d\d)$/.test(value);
}

/**
 * Why `value` cannot be the `now` an evaluation is pinned to, or undefined if it can. The one
 * rule for every place a `now` is given (a pack test, `pack eval --now`, the playground): a
 * FHIR date or dateTime; a time needs its offset ({@link lacksOffset}).
 */
export function nowProblem(value: string): string | undefined {
  if (!FHIR_DATETIME.test(value) || Number.isNaN(Date.parse(value)) || !realCalendarDate(value)) {
    return NOW_FORMAT_MESSAGE;
  }
  return lacksOffset(value) ? NOW_OFFSET_MESSAGE : undefined;
}

/**
 * Whether the calendar date a `now` starts with exists: `Date` reads `2021-02-30` as March 2nd
 * instead of refusing it.
 */
function realCalendarDate(value: string): boolean {
  const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(value);
  if (!m) {
    return true; // a year or a year-month
  }
  const [year, month, day] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const d = new Date(Date.UTC(year, month - 1, day));
  return d.getUTCFullYear() === year && d.getUTCMonth() === month - 1 && d.getUTCDate() === day;
}

/**
 * The instant a `now` names, read the same on every host: a date alone (`2021-03-01`, or a
 * year or year-month) is 00:00 UTC of its first day; a dateTime is the instant its offset
 * gives.
 * @throws RangeError with {@link nowProblem}'s message if `value` is not a valid `now`.
 */
export function parseNow(value: string): Date {
  const problem = nowProblem(value);
  if (problem !== undefined) {
    throw new RangeError(problem);
  }
  return new Date(value);
}

/** A `now` as text, checked by {@link nowProblem} (the pack schema's and the playground's). */
export const nowText = z.string().superRefine((v, ctx) => {
  const problem = nowProblem(v);
  if (problem !== undefined) {
    ctx.addIssue({ code: 'custom', message: problem });
  }
});

/** Why a test whose `expect` lists no rule id (in `fire` or `notFire`) is refused. */
export const EXPECT_NAMES_NO_RULE_MESSAGE =
  'names no rule; list the rules that must fire under fire and those that must not under notFire (e.g. notFire: [my-rule])';

const resourceObject = z
  .record(z.string(), z.unknown())
  .refine((r) => typeof r.resourceType === 'string', {
    error: 'must be a FHIR resource (resourceType missing)',
  });

const coding = z.strictObject({ system: text, code: text, display: z.string().optional() });

const service = z.strictObject({
  id: id('service'),
  hook,
  title: z.string().optional(),
  description: text,
  prefetch: z
    .record(
      z
        .string()
        .regex(PREFETCH_KEY_PATTERN, { error: 'invalid prefetch key (letters, digits, _ and -)' }),
      z.string(),
    )
    .optional(),
  usageRequirements: z.string().optional(),
});

const valueSet = z.strictObject({
  title: z.string().optional(),
  url: z.string().optional(),
  codes: z
    .array(z.strictObject({ system: text, code: text, display: z.string().optional() }))
    .min(1, { error: 'must list at least one code' }),
});

const link = z.strictObject({
  label: text,
  url: text,
  type: z.enum(['absolute', 'smart'], { error: 'must be absolute or smart' }),
  appContext: z.string().optional(),
});

const action = z.strictObject({
  type: z.enum(['create', 'update', 'delete'], { error: 'must be create, update or delete' }),
  description: z.string(),
  resource: z.record(z.string(), z.unknown()).optional(),
  resourceId: z.string().optional(),
});

const card = z.strictObject({
  summary: text,
  detail: z.string().optional(),
  indicator: z.enum(['info', 'warning', 'critical'], {
    error: 'must be info, warning or critical',
  }),
  source: z.strictObject({
    label: z.string(),
    url: z.string().optional(),
    icon: z.string().optional(),
    topic: coding.optional(),
  }),
  links: z.array(link).optional(),
  overrideReasons: z.array(coding).optional(),
  selectionBehavior: z
    .enum(['at-most-one', 'any'], { error: 'must be at-most-one or any' })
    .optional(),
  suggestions: z
    .array(
      z.strictObject({
        label: z.string(),
        isRecommended: z.boolean().optional(),
        actions: z.array(action).optional(),
      }),
    )
    .optional(),
});

const rule = z.strictObject({
  id: id('rule'),
  service: z.string(),
  title: z.string().optional(),
  description: z.string().optional(),
  when: text,
  card,
});

const testRequest = z.strictObject({
  hook,
  hookInstance: z.string().optional(),
  context: z.record(z.string(), z.unknown()),
  prefetch: z.record(z.string(), z.unknown()).optional(),
});

const test = z.strictObject({
  name: text,
  service: z.string(),
  now: nowText.optional(),
  request: testRequest.optional(),
  requestFile: text.optional(),
  patientBundle: text.optional(),
  draftOrders: z.array(resourceObject).optional(),
  expect: z
    .strictObject({
      fire: z.array(z.string()).optional(),
      notFire: z.array(z.string()).optional(),
    })
    // fire/notFire check only the rules they list: an expect naming none checks nothing, so
    // a test meant as "no card" (`fire: []`) would pass whatever the rules do.
    .refine((e) => (e.fire?.length ?? 0) + (e.notFire?.length ?? 0) > 0, {
      error: EXPECT_NAMES_NO_RULE_MESSAGE,
    }),
});

/** The native pack schema. */
export const PackSchema = z.strictObject({
  id: id('pack'),
  version: z
    .string()
    .refine((v) => semver.valid(v) === v, { error: 'must be a semantic version (e.g. 1.2.0)' }),
  title: text,
  publisher: text,
  description: text,
  effectivePeriod: z
    .strictObject({ start: dateTime.optional(), end: dateTime.optional() })
    .optional(),
  services: z.array(service).min(1, { error: 'a pack needs at least one service' }),
  valueSets: z.record(name, valueSet).optional(),
  let: z.record(name, text).optional(),
  rules: z.array(rule).min(1, { error: 'a pack needs at least one rule' }),
  tests: z
    .array(test)
    .max(MAX_PACK_TESTS, {
      error: `at most ${MAX_PACK_TESTS} tests per pack (split the pack, or keep the tests that matter)`,
    })
    .optional(),
});

/** Formats a path: `rules[2].card.links[0]`, with odd keys quoted (`prefetch["a b"]`). */
export function formatPath(path: ReadonlyArray<PropertyKey>): string {
  let out = '';
  for (const seg of path) {
    if (typeof seg === 'number') {
      out += `[${seg}]`;
    } else {
      const key = String(seg);
      out += /^[A-Za-z_$][A-Za-z0-9_$-]*$/.test(key)
        ? out === ''
          ? key
          : `.${key}`
        : `[${JSON.stringify(key)}]`;
    }
  }
  return out === '' ? '(pack)' : out;
}

function valueAt(root: unknown, path: ReadonlyArray<PropertyKey>): unknown {
  let cur = root;
  for (const seg of path) {
    if (
      typeof cur !== 'object' ||
      cur === null ||
      !Object.prototype.hasOwnProperty.call(cur, seg)
    ) {
      return undefined;
    }
    cur = (cur as Record<PropertyKey, unknown>)[seg];
  }
  return cur;
}

function typeName(v: unknown): string {
  if (v === null) {
    return 'null';
  }
  return Array.isArray(v) ? 'array' : typeof v;
}

type Issue = z.core.$ZodIssue;

/**
 * `version: 1.1` in YAML is the number 1.1: the quoted semantic version to write instead
 * (`"1.1.0"`), or undefined when the number does not read as one.
 */
function semverOf(v: number): string | undefined {
  const parts = String(v).split('.');
  while (parts.length < 3) {
    parts.push('0');
  }
  const out = parts.join('.');
  return semver.valid(out) === out ? out : undefined;
}

function issueProblems(issue: Issue, raw: unknown): PackProblem[] {
  const path = issue.path;
  // A missing field with a fixed set of values (indicator, hook, link and action type): zod
  // gives the enum's own message ("must be info, warning or critical"), which reads as if a
  // value were there; say it is required, like any other missing field, and keep the values.
  if (
    issue.code !== 'unrecognized_keys' &&
    issue.message.startsWith('must be ') &&
    valueAt(raw, path) === undefined
  ) {
    return [
      { path: formatPath(path), message: `required (${issue.message.slice('must be '.length)})` },
    ];
  }
  switch (issue.code) {
    case 'unrecognized_keys':
      return issue.keys.map((k) => ({ path: formatPath([...path, k]), message: 'unknown field' }));
    case 'invalid_type': {
      const v = valueAt(raw, path);
      const suggested =
        path.length === 1 && path[0] === 'version' && typeof v === 'number'
          ? semverOf(v)
          : undefined;
      return [
        {
          path: formatPath(path),
          message:
            v === undefined
              ? 'required'
              : `expected ${issue.expected}, got ${typeName(v)}${suggested ? `: write it as a quoted semantic version, e.g. "${suggested}"` : ''}`,
        },
      ];
    }
    case 'invalid_key': {
      const inner = issue.issues[0];
      return [{ path: formatPath(path), message: inner ? inner.message : issue.message }];
    }
    case 'invalid_union':
    case 'invalid_element':
      return [{ path: formatPath(path), message: issue.message }];
    case 'too_small':
    case 'too_big':
    case 'invalid_value':
    case 'invalid_format':
    case 'not_multiple_of':
    case 'custom':
      return [{ path: formatPath(path), message: issue.message }];
  }
}

/** Checks a raw pack against the schema. Returns every problem (empty = schema-valid). */
export function schemaProblems(raw: unknown): PackProblem[] {
  const r = PackSchema.safeParse(raw);
  if (r.success) {
    return [];
  }
  return r.error.issues.flatMap((i) => issueProblems(i, raw));
}
