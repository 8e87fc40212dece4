/**
 * Validation of an uploaded (or locally authored) pack: schema, FHIRPath, card limits,
 * references between parts, prefetch templates, suggestion resources, embedded tests.
 * Collects every problem before failing.
 */
import fhirpath from 'fhirpath';
import { validateFhirResource } from '../fhir-profiles/index.ts';
import {
  CARD_TEXT_LIMIT,
  cardTextFields,
  compilePack,
  FHIR_ID,
  findLetCycle,
  PACK_CHARS_MESSAGE,
  packScope,
  RELATIVE_REFERENCE,
} from './compile-pack.ts';
import { PackValidationError } from './errors.ts';
import { findBadReference, isAbsoluteHttpUrl } from './evaluate-core.ts';
import { createEvaluator } from './evaluator.ts';
import type { Evaluator } from './evaluator.ts';
import {
  analyzeExpression,
  EXPRESSION_LIMITS,
  expressionSize,
  formatIssue,
  hasInterpolation,
  parseTemplate,
  RESERVED_NAMES,
  staticText,
} from './expression.ts';
import type { ExprScope } from './expression.ts';
import { schemaProblems } from './pack-schema.ts';
import { collectPackFiles, runPackTests, uncoveredRules } from './pack-tests.ts';
import { isPlanDefinition, planDefinitionToPack } from './plan-definition.ts';
import { checkPrefetchTemplate } from './prefetch-template.ts';
import type { CompiledPack, PackProblem, RulePack } from './types.ts';

/** Options of {@link validatePack}. */
export interface ValidatePackOptions {
  /** Directory the pack file is in: file-based tests are read relative to it. */
  baseDir?: string;
  /** Run the embedded tests (default true). */
  runTests?: boolean;
  /** Evaluator for the tests; default a temporary one (1 worker, closed afterwards). */
  evaluator?: Evaluator;
  /**
   * The live call budget (ms) the tests' evaluation is held to once they pass (see
   * `RunPackTestsOptions.liveCallBudgetMs`): a test over it is a problem. Default: not checked.
   */
  liveCallBudgetMs?: number;
  /**
   * Called with each warning of the passing tests (`tests[3]: test 'x' takes 300 ms ...`, a
   * test over half the live call budget), as an upload returns them. Default: dropped.
   */
  onWarning?: (warning: string) => void;
  /**
   * Test coverage (with the tests run): every rule must fire in at least one of the pack's
   * tests, else it is a problem at `rules[i]` (`rule 'x' fires in none of the pack's tests: add
   * a test where it fires`; see `uncoveredRules`). A pack without tests (a PlanDefinition) is
   * then refused. Default false; `pack validate`, `pack test` and uploads turn it on
   * (CELLCDS_PACK_TEST_COVERAGE).
   */
  requireCoverage?: boolean;
}

type Json = Record<string, unknown>;

const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);

function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function arr(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}

function keyPath(base: string, key: string): string {
  return /^[A-Za-z_$][A-Za-z0-9_$-]*$/.test(key)
    ? `${base}.${key}`
    : `${base}[${JSON.stringify(key)}]`;
}

/** `__proto__`, `constructor`, `prototype` keys anywhere: refused (prototype pollution). */
function forbiddenKeyProblems(value: unknown, path: string, out: PackProblem[], depth = 0): void {
  if (depth > 200) {
    out.push({ path, message: 'nested too deeply' });
    return;
  }
  if (Array.isArray(value)) {
    value.forEach((v, i) => {
      forbiddenKeyProblems(v, `${path}[${i}]`, out, depth + 1);
    });
  } else if (isObj(value)) {
    for (const key of Object.keys(value)) {
      const p = path === '' ? key : keyPath(path, key);
      if (FORBIDDEN_KEYS.has(key)) {
        out.push({ path: p, message: 'forbidden key' });
      } else {
        forbiddenKeyProblems(value[key], p, out, depth + 1);
      }
    }
  }
}

/** A node of fhirpath.js's parse tree (the part of its shape read here). */
interface ParseNode {
  type: string;
  text?: string;
  children?: ParseNode[];
}

function isParseNode(v: unknown): v is ParseNode {
  return isObj(v) && typeof v.type === 'string';
}

/** Binary operators a constant condition may combine constants with. */
const CONSTANT_OPERATORS: ReadonlySet<string> = new Set([
  'EqualityExpression',
  'InequalityExpression',
  'AndExpression',
  'OrExpression',
  'XorExpression',
  'ImpliesExpression',
  'AdditiveExpression',
  'MultiplicativeExpression',
  'UnionExpression',
]);

/** Functions without arguments that keep a constant constant. */
const CONSTANT_FUNCTIONS: ReadonlySet<string> = new Set(['not', 'empty', 'exists']);

/**
 * The text of a parse subtree made only of literals (`false`, `{}`, `1`, `'a'`, dates,
 * quantities), the operators above, a sign, brackets and `.not()`/`.empty()`/`.exists()`,
 * fully bracketed; undefined for anything else (a path, a `%variable`, another function):
 * its value may depend on the call. Not a proof of anything beyond that literal form.
 */
function constantText(node: ParseNode): string | undefined {
  const kids = node.children ?? [];
  const one = kids.length === 1 && kids[0] ? kids[0] : undefined;
  switch (node.type) {
    case 'EntireExpression':
    case 'TermExpression':
      return one ? constantText(one) : undefined;
    case 'ParenthesizedTerm': {
      const inner = one ? constantText(one) : undefined;
      return inner === undefined ? undefined : `(${inner})`;
    }
    case 'LiteralTerm':
      return node.text;
    case 'PolarityExpression': {
      const inner = one ? constantText(one) : undefined;
      return inner === undefined || node.text === undefined ? undefined : `${node.text}${inner}`;
    }
    case 'InvocationExpression': {
      const [target, call] = kids;
      const name = call?.type === 'FunctionInvocation' ? call.text : undefined;
      const hasArgs = (call?.children?.[0]?.children ?? []).some((c) => c.type === 'ParamList');
      const inner = target && kids.length === 2 ? constantText(target) : undefined;
      return inner === undefined || name === undefined || !CONSTANT_FUNCTIONS.has(name) || hasArgs
        ? undefined
        : `(${inner}).${name}()`;
    }
    default: {
      const [left, right] = kids;
      if (!CONSTANT_OPERATORS.has(node.type) || kids.length !== 2 || !left || !right) {
        return undefined;
      }
      const l = constantText(left);
      const r = constantText(right);
      return l === undefined || r === undefined || node.text === undefined
        ? undefined
        : `(${l}) ${node.text} (${r})`;
    }
  }
}

/** What a `when` that can never be true always gives. */
type NeverTrue = 'false' | 'empty' | 'empty or false';

/**
 * Whether a rule's `when` (its parse tree) can never be `true`: a constant that is false or
 * empty (`false`, `{}`, `1 = 2`, `true.not()`), or an `and` with such an operand (`false and
 * ...`: a rule switched off while looking like a condition). Constants are evaluated with
 * fhirpath.js, as the engine would; anything that reads the call is assumed satisfiable (this
 * is a literal check, not a proof). Undefined when the condition may be true.
 */
function neverTrue(node: ParseNode): NeverTrue | undefined {
  const text = constantText(node);
  if (text !== undefined) {
    let result: unknown;
    try {
      result = fhirpath.evaluate({}, text);
    } catch {
      return undefined; // fails on every call: the "checks could not run" card says so
    }
    if (Array.isArray(result) && result.length === 0) {
      return 'empty';
    }
    return Array.isArray(result) && result.length === 1 && result[0] === false
      ? 'false'
      : undefined;
  }
  const kids = node.children ?? [];
  const [first, second] = kids;
  if (node.type === 'AndExpression' && kids.length === 2 && first && second) {
    const l = neverTrue(first);
    const r = neverTrue(second);
    if (l === 'false' || r === 'false') {
      return 'false';
    }
    return l === undefined && r === undefined ? undefined : 'empty or false';
  }
  if (
    (node.type === 'EntireExpression' ||
      node.type === 'TermExpression' ||
      node.type === 'ParenthesizedTerm') &&
    kids.length === 1 &&
    first
  ) {
    return neverTrue(first);
  }
  return undefined;
}

/** Interpolations may fill in parts of a URL; the static skeleton must still be absolute. */
function isAbsoluteSkeleton(text: string): boolean {
  return isAbsoluteHttpUrl(text.replace(/\{\{[\s\S]*?\}\}/g, 'x'));
}

function duplicates(
  values: unknown[],
  label: string,
  pathOf: (i: number) => string,
  out: PackProblem[],
): void {
  const seen = new Set<string>();
  values.forEach((v, i) => {
    if (typeof v !== 'string') {
      return;
    }
    if (seen.has(v)) {
      out.push({ path: pathOf(i), message: `duplicate ${label} '${v}'` });
    }
    seen.add(v);
  });
}

/**
 * The code system URLs of the terminologies packs use (FHIR R4 terminology page; the shipped
 * pack, fhir-profiles/ and the Synthea fixtures use these spellings).
 */
const KNOWN_SYSTEMS: ReadonlyArray<{ name: string; url: string }> = [
  { name: 'RxNorm', url: 'http://www.nlm.nih.gov/research/umls/rxnorm' },
  { name: 'SNOMED CT', url: 'http://snomed.info/sct' },
  { name: 'LOINC', url: 'http://loinc.org' },
  { name: 'ICD-10-CM', url: 'http://hl7.org/fhir/sid/icd-10-cm' },
  { name: 'ICD-10', url: 'http://hl7.org/fhir/sid/icd-10' },
  { name: 'NDC', url: 'http://hl7.org/fhir/sid/ndc' },
  { name: 'CVX', url: 'http://hl7.org/fhir/sid/cvx' },
  { name: 'CPT', url: 'http://www.ama-assn.org/go/cpt' },
  { name: 'UCUM', url: 'http://unitsofmeasure.org' },
];

function systemKey(url: string): string {
  return url
    .trim()
    .toLowerCase()
    .replace(/^https:/, 'http:')
    .replace(/\/+$/, '');
}

const KNOWN_SYSTEM_KEYS = new Map(KNOWN_SYSTEMS.map((s) => [systemKey(s.url), s]));

/**
 * The well-known system a value set's `system` was meant to be, when it differs from it only
 * in case, a trailing slash, https or spaces. FHIR compares system URLs exactly, so such a code
 * never matches an EHR's coding: `inValueSet` is silently false.
 */
function nearKnownSystem(system: string): { name: string; url: string } | undefined {
  const known = KNOWN_SYSTEM_KEYS.get(systemKey(system));
  return known && known.url !== system ? known : undefined;
}

class PackChecker {
  readonly problems: PackProblem[] = [];
  private readonly services: Json[];
  private readonly serviceIds: Set<string>;
  private readonly rules: Json[];
  private readonly scope: ExprScope;
  /** Characters of the pack's expressions so far. */
  private chars = 0;

  constructor(private readonly raw: Json) {
    this.services = arr(raw.services).filter(isObj);
    this.serviceIds = new Set(
      this.services.map((s) => s.id).filter((id): id is string => typeof id === 'string'),
    );
    this.rules = arr(raw.rules).filter(isObj);
    this.scope = packScope({
      let: isObj(raw.let) ? (raw.let as Record<string, string>) : undefined,
      valueSets: isObj(raw.valueSets) ? (raw.valueSets as RulePack['valueSets']) : undefined,
    });
  }

  private add(path: string, message: string): void {
    this.problems.push({ path, message });
  }

  /**
   * Counts an expression against the pack's budget (`EXPRESSION_LIMITS.packChars`): every
   * thread that evaluates the pack compiles all of it. The expression that crosses the budget
   * is named.
   */
  private withinPackBudget(source: string, path: string): boolean {
    const before = this.chars;
    this.chars += expressionSize(source).size;
    if (this.chars <= EXPRESSION_LIMITS.packChars) {
      return true;
    }
    if (before <= EXPRESSION_LIMITS.packChars) {
      this.add(path, PACK_CHARS_MESSAGE);
    }
    return false;
  }

  /** Checks an expression; returns its parse tree when it has no problem. */
  private expression(source: unknown, path: string): ParseNode | undefined {
    if (typeof source !== 'string' || source.trim() === '') {
      return undefined;
    }
    if (!this.withinPackBudget(source, path)) {
      return undefined;
    }
    const analysis = analyzeExpression(source, this.scope);
    for (const issue of analysis.issues) {
      this.add(path, formatIssue(issue));
    }
    return analysis.issues.length === 0 && isParseNode(analysis.ast) ? analysis.ast : undefined;
  }

  private template(text: string, path: string): void {
    if (!hasInterpolation(text)) {
      return;
    }
    const parsed = parseTemplate(text);
    if (!parsed.ok) {
      this.add(path, parsed.message);
      return;
    }
    for (const part of parsed.parts) {
      if (part.kind === 'expr') {
        if (!this.withinPackBudget(part.expr, path)) {
          return;
        }
        for (const issue of analyzeExpression(part.expr, this.scope).issues) {
          this.add(path, formatIssue(issue, { line: part.line, column: part.column }));
        }
      }
    }
  }

  checkAll(hasBaseDir: boolean): void {
    this.checkPeriod();
    this.checkServices();
    this.checkNames();
    this.checkRules();
    this.checkTests(hasBaseDir);
  }

  private checkPeriod(): void {
    const p = this.raw.effectivePeriod;
    if (isObj(p) && typeof p.start === 'string' && typeof p.end === 'string' && p.start > p.end) {
      this.add('effectivePeriod', 'start is after end');
    }
  }

  private checkServices(): void {
    duplicates(
      this.services.map((s) => s.id),
      'service id',
      (i) => `services[${i}].id`,
      this.problems,
    );
    arr(this.raw.services).forEach((s, i) => {
      if (!isObj(s) || !isObj(s.prefetch)) {
        return;
      }
      for (const [key, template] of Object.entries(s.prefetch)) {
        if (typeof template === 'string') {
          const msg = checkPrefetchTemplate(template);
          if (msg !== undefined) {
            this.add(keyPath(`services[${i}].prefetch`, key), msg);
          }
        }
      }
    });
  }

  private checkNames(): void {
    const lets = isObj(this.raw.let) ? this.raw.let : {};
    const valueSets = isObj(this.raw.valueSets) ? this.raw.valueSets : {};
    for (const [name, vs] of Object.entries(valueSets)) {
      if (RESERVED_NAMES.has(name)) {
        this.add(keyPath('valueSets', name), `'${name}' is a reserved name`);
      }
      if (isObj(vs)) {
        arr(vs.codes).forEach((c, j) => {
          const near =
            isObj(c) && typeof c.system === 'string' ? nearKnownSystem(c.system) : undefined;
          if (near) {
            this.add(
              `${keyPath('valueSets', name)}.codes[${j}].system`,
              `not the ${near.name} system URL: did you mean '${near.url}'? (a code system URL must match exactly: this one never matches an EHR's coding)`,
            );
          }
        });
      }
    }
    for (const [name, source] of Object.entries(lets)) {
      const path = keyPath('let', name);
      if (RESERVED_NAMES.has(name)) {
        this.add(path, `'${name}' is a reserved name`);
      }
      if (Object.hasOwn(valueSets, name)) {
        this.add(path, `'${name}' is also the name of a value set`);
      }
      this.expression(source, path);
    }
    // Dependencies between lets (any order is allowed; a cycle is not).
    const deps = new Map<string, string[]>();
    for (const [name, source] of Object.entries(lets)) {
      if (typeof source === 'string') {
        const vars = analyzeExpression(source, this.scope).variables;
        deps.set(name, [...vars].filter((v) => Object.hasOwn(lets, v)).sort());
      }
    }
    const cycle = findLetCycle(deps);
    if (cycle?.[0] !== undefined) {
      this.add(keyPath('let', cycle[0]), `lets form a cycle: ${cycle.join(' -> ')}`);
    }
  }

  private checkRules(): void {
    duplicates(
      this.rules.map((r) => r.id),
      'rule id',
      (i) => `rules[${i}].id`,
      this.problems,
    );
    arr(this.raw.rules).forEach((r, i) => {
      if (!isObj(r)) {
        return;
      }
      const base = `rules[${i}]`;
      if (typeof r.service === 'string' && !this.serviceIds.has(r.service)) {
        this.add(`${base}.service`, `unknown service '${r.service}'`);
      }
      const when = this.expression(r.when, `${base}.when`);
      // A version must not switch a safety rule off unnoticed (`when: 'false'` was accepted).
      const never = when === undefined ? undefined : neverTrue(when);
      if (never !== undefined) {
        this.add(
          `${base}.when`,
          `rule '${typeof r.id === 'string' ? r.id : String(i)}' can never fire: its condition is always ${never}`,
        );
      }
      if (isObj(r.card)) {
        this.checkCard(r.card, `${base}.card`);
      }
    });
  }

  private checkCard(card: Json, base: string): void {
    for (const field of cardTextFields(card)) {
      this.template(field.text, `${base}.${field.path}`);
      if (field.path !== 'summary' && hasInterpolation(field.text)) {
        // Interpolated fields are cut off at run time past CARD_TEXT_LIMIT (a rule error).
        const parsed = parseTemplate(field.text);
        const fixed = parsed.ok ? staticText(parsed.parts).length : 0;
        if (fixed > CARD_TEXT_LIMIT) {
          this.add(
            `${base}.${field.path}`,
            `must be at most ${CARD_TEXT_LIMIT} characters after interpolation (static text is ${fixed})`,
          );
        }
      }
    }
    if (typeof card.summary === 'string') {
      const parsed = parseTemplate(card.summary);
      const text = parsed.ok ? staticText(parsed.parts) : card.summary;
      if (text.length >= 140) {
        this.add(
          `${base}.summary`,
          `must be under 140 characters (${parsed.ok && parsed.parts.length > 1 ? 'static text is' : 'got'} ${text.length})`,
        );
      }
    }
    const source = card.source;
    if (isObj(source)) {
      if (source.label === '') {
        this.add(`${base}.source.label`, 'must not be empty');
      }
      for (const f of ['url', 'icon'] as const) {
        const value = source[f];
        if (typeof value !== 'string') {
          continue;
        }
        // The source is copied into the card as it is: never interpolated, so its raw text is
        // what the EHR gets (and what finalizeCards checks).
        if (hasInterpolation(value)) {
          this.add(`${base}.source.${f}`, 'is not interpolated: {{ }} is not allowed here');
        } else if (!isAbsoluteSkeleton(value)) {
          this.add(`${base}.source.${f}`, 'must be an absolute http(s) URL');
        }
      }
    }
    arr(card.links).forEach((l, i) => {
      if (!isObj(l)) {
        return;
      }
      const p = `${base}.links[${i}]`;
      if (typeof l.url === 'string' && l.url !== '' && !isAbsoluteSkeleton(l.url)) {
        this.add(`${p}.url`, 'must be an absolute http(s) URL');
      }
      if (l.appContext !== undefined && l.type === 'absolute') {
        this.add(`${p}.appContext`, 'only allowed on smart links');
      }
    });
    arr(card.overrideReasons).forEach((c, i) => {
      if (isObj(c) && (typeof c.display !== 'string' || c.display === '')) {
        this.add(`${base}.overrideReasons[${i}].display`, 'required in overrideReasons');
      }
    });
    const suggestions = arr(card.suggestions);
    const recommended = suggestions.filter((s) => isObj(s) && s.isRecommended === true).length;
    if (recommended > 1 && card.selectionBehavior !== 'any') {
      this.add(
        `${base}.suggestions`,
        'at most one suggestion may be recommended unless selectionBehavior is any',
      );
    }
    suggestions.forEach((s, i) => {
      if (!isObj(s)) {
        return;
      }
      const p = `${base}.suggestions[${i}]`;
      if (s.label === '') {
        this.add(`${p}.label`, 'must not be empty');
      }
      arr(s.actions).forEach((a, j) => {
        if (isObj(a)) {
          this.checkAction(a, `${p}.actions[${j}]`);
        }
      });
    });
  }

  private checkAction(a: Json, p: string): void {
    if (a.description === '') {
      this.add(`${p}.description`, 'must not be empty');
    }
    if (a.type === 'delete') {
      if (a.resource !== undefined) {
        this.add(`${p}.resource`, 'delete uses resourceId, not resource');
      }
      if (a.resourceId === undefined) {
        this.add(`${p}.resourceId`, 'required for delete (Type/id)');
      }
    } else if (a.type === 'create' || a.type === 'update') {
      if (a.resource === undefined) {
        this.add(`${p}.resource`, `required for ${a.type}`);
      } else if (
        a.type === 'update' &&
        isObj(a.resource) &&
        (typeof a.resource.id !== 'string' || a.resource.id === '')
      ) {
        // CDS Hooks 2.0: an update carries the whole resource, which the EHR replaces by id.
        this.add(`${p}.resource.id`, 'required for update (the id of the resource it replaces)');
      } else if (
        isObj(a.resource) &&
        typeof a.resource.id === 'string' &&
        a.resource.id !== '' &&
        !hasInterpolation(a.resource.id) &&
        !FHIR_ID.test(a.resource.id)
      ) {
        // An interpolated id is checked when the card is built (compile-pack.ts `checkedText`).
        this.add(`${p}.resource.id`, 'must be a FHIR id (1-64 of A-Z a-z 0-9 - .)');
      }
    }
    if (
      typeof a.resourceId === 'string' &&
      !hasInterpolation(a.resourceId) &&
      !RELATIVE_REFERENCE.test(a.resourceId)
    ) {
      this.add(`${p}.resourceId`, 'must be a relative reference Type/id');
    }
    if (
      (a.type === 'create' || a.type === 'update') &&
      isObj(a.resource) &&
      !JSON.stringify(a.resource).includes('{{')
    ) {
      for (const issue of validateFhirResource(a.resource)) {
        this.add(
          issue.path === '' ? `${p}.resource` : `${p}.resource.${issue.path}`,
          issue.message,
        );
      }
      // The FHIR validator accepts `Patient/` or `#`; the engine would drop such a suggestion
      // on every call (an interpolated reference is checked when the card is built).
      const bad = findBadReference(a.resource);
      if (bad !== undefined) {
        this.add(
          `${p}.resource${bad}`,
          'must be a FHIR reference (Type/id, an absolute URL to one, #id, urn:uuid or urn:oid)',
        );
      }
    }
  }

  private checkTests(hasBaseDir: boolean): void {
    const tests = arr(this.raw.tests);
    duplicates(
      tests.map((t) => (isObj(t) ? t.name : undefined)),
      'test name',
      (i) => `tests[${i}].name`,
      this.problems,
    );
    const ruleService = new Map<string, unknown>(this.rules.map((r) => [String(r.id), r.service]));
    tests.forEach((t, i) => {
      if (!isObj(t)) {
        return;
      }
      const base = `tests[${i}]`;
      const service = this.services.find((s) => s.id === t.service);
      if (typeof t.service === 'string' && !service) {
        this.add(`${base}.service`, `unknown service '${t.service}'`);
      }
      const sources = ['request', 'requestFile', 'patientBundle'].filter((k) => t[k] !== undefined);
      if (sources.length !== 1) {
        this.add(base, 'needs exactly one of request, requestFile, patientBundle');
      }
      if (t.draftOrders !== undefined && t.patientBundle === undefined) {
        this.add(`${base}.draftOrders`, 'only used with patientBundle');
      }
      if (!hasBaseDir && sources.length === 1) {
        for (const k of ['requestFile', 'patientBundle']) {
          if (t[k] !== undefined) {
            // An upload to the admin API carries no files; `pack push` inlines them first.
            this.add(
              `${base}.${k}`,
              'a test file cannot be read in an upload (no base directory): push the pack with `npx cellcds pack push <file>`, which inlines test files, or give the test an inline request',
            );
          }
        }
      }
      if (
        isObj(t.request) &&
        service &&
        typeof service.hook === 'string' &&
        typeof t.request.hook === 'string' &&
        t.request.hook !== service.hook
      ) {
        this.add(`${base}.request.hook`, `service '${String(service.id)}' serves ${service.hook}`);
      }
      if (!isObj(t.expect)) {
        return;
      }
      const fire = new Set(arr(t.expect.fire).filter((x): x is string => typeof x === 'string'));
      for (const key of ['fire', 'notFire'] as const) {
        arr(t.expect[key]).forEach((id, j) => {
          if (typeof id !== 'string') {
            return;
          }
          const p = `${base}.expect.${key}[${j}]`;
          if (!Array.isArray(this.raw.rules)) {
            return;
          }
          if (!ruleService.has(id)) {
            this.add(p, `unknown rule '${id}'`);
          } else if (service && ruleService.get(id) !== t.service) {
            this.add(
              p,
              `rule '${id}' belongs to service '${String(ruleService.get(id))}', not '${String(t.service)}'`,
            );
          } else if (key === 'notFire' && fire.has(id)) {
            this.add(p, `rule '${id}' is also expected to fire`);
          }
        });
      }
    });
  }
}

/**
 * Validates a pack (native form or PlanDefinition) and compiles it. Every problem is
 * collected with its path; then, if there are none and `runTests` is not false, the embedded
 * tests run and each failing expectation is a problem (`tests[2]: expected rule x to fire`).
 * With `baseDir`, file-based tests are resolved (the returned pack has them inline); a test
 * whose file cannot be read or used is a problem listed with all the others, in the same run
 * (the rest of that test is still checked, its request is not).
 * @throws PackValidationError listing every problem.
 */
export async function validatePack(
  raw: unknown,
  opts: ValidatePackOptions = {},
): Promise<CompiledPack> {
  let input = raw;
  if (isPlanDefinition(input)) {
    input = planDefinitionToPack(input);
  }
  const problems: PackProblem[] = [];
  if (!isObj(input)) {
    throw new PackValidationError([{ path: '(pack)', message: 'a pack must be an object' }]);
  }
  forbiddenKeyProblems(input, '', problems);
  if (problems.length > 0) {
    // Do not look further into an object built to pollute prototypes.
    throw new PackValidationError(problems);
  }
  let pack: Json = input;
  if (opts.baseDir !== undefined) {
    // A test whose file cannot be used is one problem, reported with all the others; that
    // test stays file-based, so the checks below leave its (unknown) request out.
    const files = collectPackFiles(pack, opts.baseDir);
    pack = isObj(files.pack) ? files.pack : pack;
    // The files' content is part of the pack now: refused as above.
    const forbidden: PackProblem[] = [];
    arr(pack.tests).forEach((t, i) => {
      forbiddenKeyProblems(t, `tests[${i}]`, forbidden);
    });
    if (forbidden.length > 0) {
      throw new PackValidationError([...files.problems, ...forbidden]);
    }
    problems.push(...files.problems);
  }
  problems.push(...schemaProblems(pack));
  const checker = new PackChecker(pack);
  checker.checkAll(opts.baseDir !== undefined);
  problems.push(...checker.problems);
  if (problems.length > 0) {
    throw new PackValidationError(dedupe(problems));
  }
  const compiled = compilePack(pack as unknown as RulePack);
  const coverage = opts.runTests !== false && opts.requireCoverage === true;
  if (coverage && (compiled.pack.tests?.length ?? 0) === 0) {
    throw new PackValidationError(uncoveredRules(compiled, []));
  }
  if (opts.runTests !== false && (compiled.pack.tests?.length ?? 0) > 0) {
    const evaluator = opts.evaluator ?? createEvaluator({ workers: 1 });
    try {
      let uncovered: PackProblem[] = [];
      const results = await runPackTests(compiled, evaluator, {
        ...(opts.liveCallBudgetMs !== undefined ? { liveCallBudgetMs: opts.liveCallBudgetMs } : {}),
        ...(coverage ? { onUncovered: (u: PackProblem[]) => (uncovered = u) } : {}),
      });
      results.forEach((r, i) => {
        for (const f of r.failures) {
          problems.push({ path: `tests[${i}]`, message: f });
        }
      });
      problems.push(...uncovered);
      if (problems.length === 0 && opts.onWarning) {
        results.forEach((r, i) => {
          for (const w of r.warnings ?? []) {
            opts.onWarning?.(`tests[${i}]: ${w}`);
          }
        });
      }
    } finally {
      if (!opts.evaluator) {
        await evaluator.close();
      }
    }
    if (problems.length > 0) {
      throw new PackValidationError(problems);
    }
  }
  return compiled;
}

function dedupe(problems: PackProblem[]): PackProblem[] {
  const seen = new Set<string>();
  return problems.filter((p) => {
    const k = `${p.path}\u0000${p.message}`;
    if (seen.has(k)) {
      return false;
    }
    seen.add(k);
    return true;
  });
}
