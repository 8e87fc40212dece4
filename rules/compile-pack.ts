/**
 * Compilation of a (validated) pack into a program: every FHIRPath expression compiled once,
 * card templates split into text and compiled interpolations, `let` dependencies resolved.
 * Programs are cached by content hash, in the main thread and in each evaluation worker.
 */
import { PackValidationError } from './errors.ts';
import {
  analyzeExpression,
  buildFunctionTable,
  compileExpression,
  EXPRESSION_LIMITS,
  expressionSize,
  formatIssue,
  hasInterpolation,
  indexValueSets,
  itemText,
  parseTemplate,
  SafeEvalError,
} from './expression.ts';
import type { CompiledFn, ExprScope, ValueSetIndex } from './expression.ts';
import { chargeText, compileFast, SubtreeKeys, withFallback } from './fast-path.ts';
import { packHash, packHashSteps } from './pack-format.ts';
import type {
  ActionType,
  CardTemplate,
  CompiledPack,
  PackProblem,
  PackRule,
  RulePack,
} from './types.ts';

/**
 * The longest text an interpolated card field may have after interpolation (detail, labels,
 * urls, appContext, action descriptions and resourceIds, a resource's string leaves; a leaf that
 * is one `{{ }}` keeping its typed value is measured as JSON). Longer fails the rule with a
 * trace error naming the field. (The summary's own limit, 140, is checked by the engine.)
 */
export const CARD_TEXT_LIMIT = 16_384;

const TEXT_TOO_LONG = `longer than ${CARD_TEXT_LIMIT} characters after interpolation`;

/**
 * The text of a template's parts, refused past `CARD_TEXT_LIMIT` before it is built (each
 * interpolation's items are measured first: a collection of big strings is never joined).
 */
function renderBounded(
  parts: ReadonlyArray<string | CompiledFn>,
  root: unknown,
  vars: Record<string, unknown>,
): string {
  let out = '';
  for (const part of parts) {
    if (typeof part === 'string') {
      if (out.length + part.length > CARD_TEXT_LIMIT) {
        throw new SafeEvalError(TEXT_TOO_LONG);
      }
      out += part;
      continue;
    }
    const items = part(root, vars);
    const texts: string[] = new Array<string>(items.length);
    let length = out.length;
    for (let i = 0; i < items.length; i++) {
      const t = itemText(items[i]);
      length += t.length + (i > 0 ? 2 : 0);
      if (length > CARD_TEXT_LIMIT) {
        throw new SafeEvalError(TEXT_TOO_LONG);
      }
      texts[i] = t;
    }
    out += texts.join(', ');
  }
  chargeText(out.length);
  return out;
}

/** Whether JSON-like values would take more than `limit` characters as JSON (a bounded walk). */
function jsonLongerThan(values: readonly unknown[], limit: number): boolean {
  let size = 0;
  const stack: unknown[] = [...values];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v === 'string') {
      size += v.length + 2;
    } else if (Array.isArray(v)) {
      size += 2 + v.length;
      for (const x of v) {
        stack.push(x);
      }
    } else if (typeof v === 'object' && v !== null) {
      size += 2;
      for (const [k, x] of Object.entries(v)) {
        size += k.length + 4;
        stack.push(x);
      }
    } else {
      size += 8;
    }
    if (size > limit) {
      return true;
    }
  }
  return false;
}

/** A FHIR id (R4 `id` datatype): 1-64 of `A-Z a-z 0-9 - .`. */
export const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
/** A relative reference `Type/id`, as a CDS Hooks action's `resourceId` must be. */
export const RELATIVE_REFERENCE = /^[A-Za-z]+\/[A-Za-z0-9\-.]{1,64}$/;

/**
 * Wraps an interpolated text so that a value interpolation leaves non-empty but not of the
 * `valid` form fails the rule (`SafeEvalError`, caught per rule by `buildCard`, which prefixes
 * the field). An empty value passes through: `buildCard` refuses it where the field is required
 * (a delete's resourceId, an update's resource id) and stripping drops it elsewhere. Values come
 * from patient data, so the message never carries them. `MedicationRequest/{{ %draft.id }}`
 * with a draft that has no id gave `MedicationRequest/`, which went to the EHR as a delete.
 */
function checkedText(text: CompiledText, valid: RegExp, message: string): CompiledText {
  const check = (items: unknown[]): unknown[] => {
    if (items.length === 0) {
      return items;
    }
    const only = items.length === 1 ? items[0] : undefined;
    if (only === '' || (typeof only === 'string' && valid.test(only))) {
      return items;
    }
    throw new SafeEvalError(message);
  };
  const out: CompiledText = {
    parts: text.parts.map((part) =>
      typeof part === 'string' ? part : (root, vars) => check(part(root, vars)),
    ),
  };
  const whole = text.whole;
  if (whole) {
    out.whole = (root, vars) => check(whole(root, vars));
  }
  return out;
}

/**
 * A create's or update's resource whose top-level `id` is interpolated must come out a valid
 * FHIR id (or empty: a create's is then dropped, an update's refused by `buildCard`).
 */
function checkedResourceId(v: CompiledValue): CompiledValue {
  if (v.kind !== 'object') {
    return v;
  }
  return {
    kind: 'object',
    entries: v.entries.map(([k, x]): [string, CompiledValue] =>
      k === 'id' && x.kind === 'text'
        ? [
            k,
            {
              kind: 'text',
              text: checkedText(x.text, FHIR_ID, 'id is not a valid FHIR id after interpolation'),
            },
          ]
        : [k, x],
    ),
  };
}

/** A compiled template string: literal text and compiled `{{ }}` interpolations. */
export interface CompiledText {
  parts: Array<string | CompiledFn>;
  /** Set when the whole string is one interpolation (resource templates keep its typed value). */
  whole?: CompiledFn;
}

/** A compiled FHIR resource template (JSON with interpolated string leaves). */
export type CompiledValue =
  | { kind: 'static'; value: unknown }
  | { kind: 'text'; text: CompiledText }
  | { kind: 'array'; items: CompiledValue[] }
  | { kind: 'object'; entries: Array<[string, CompiledValue]> };

export interface CompiledAction {
  type: ActionType;
  description: CompiledText;
  resource?: CompiledValue;
  resourceId?: CompiledText;
}

export interface CompiledCard {
  summary: CompiledText;
  detail?: CompiledText;
  template: CardTemplate;
  links?: Array<{ label: CompiledText; url: CompiledText; appContext?: CompiledText }>;
  suggestions?: Array<{ label: CompiledText; actions?: CompiledAction[] }>;
}

export interface CompiledRule {
  id: string;
  service: string;
  when: CompiledFn;
  card: CompiledCard;
  /** `let` names the rule reads directly (each let's own dependencies are resolved on use). */
  lets: string[];
}

export interface CompiledLet {
  name: string;
  /** Compiled in raw mode: the value keeps its FHIR types when passed on as `%name`. */
  fn: CompiledFn;
  /** `let` names this let reads, sorted. */
  deps: string[];
}

/** A pack ready to evaluate. */
export interface PackProgram {
  hash: string;
  pack: RulePack;
  lets: Map<string, CompiledLet>;
  rules: CompiledRule[];
  rulesById: Map<string, CompiledRule>;
  valueSets: Map<string, ValueSetIndex>;
  /**
   * Every expression of the pack compiled on the fast path (none needs fhirpath.js by its
   * form), so the pack may be evaluated in the calling thread under `runGuarded`.
   */
  allFast: boolean;
}

/** The scope of a pack's expressions: its let and value-set names. */
export function packScope(pack: Pick<RulePack, 'let' | 'valueSets'>): ExprScope {
  const valueSets = new Set(Object.keys(pack.valueSets ?? {}));
  return { names: new Set([...Object.keys(pack.let ?? {}), ...valueSets]), valueSets };
}

/** A string field of a card that may carry `{{ }}` interpolations, with its path. */
export interface CardTextField {
  /** Path below the card, e.g. `links[0].url`. */
  path: string;
  text: string;
}

function resourceStrings(value: unknown, path: string, out: CardTextField[]): void {
  if (typeof value === 'string') {
    out.push({ path, text: value });
  } else if (Array.isArray(value)) {
    value.forEach((v, i) => {
      resourceStrings(v, `${path}[${i}]`, out);
    });
  } else if (typeof value === 'object' && value !== null) {
    for (const [k, v] of Object.entries(value)) {
      resourceStrings(
        v,
        /^[A-Za-z_][A-Za-z0-9_]*$/.test(k) ? `${path}.${k}` : `${path}[${JSON.stringify(k)}]`,
        out,
      );
    }
  }
}

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Every interpolatable string of a card (summary, detail, link label/url/appContext,
 * suggestion labels, action descriptions and resourceIds, resource string leaves).
 * Tolerates malformed input (used by validation before the schema is known to hold).
 */
export function cardTextFields(card: unknown): CardTextField[] {
  const out: CardTextField[] = [];
  if (!isObj(card)) {
    return out;
  }
  const str = (v: unknown, path: string) => {
    if (typeof v === 'string') {
      out.push({ path, text: v });
    }
  };
  str(card.summary, 'summary');
  str(card.detail, 'detail');
  if (Array.isArray(card.links)) {
    card.links.forEach((l: unknown, i) => {
      if (isObj(l)) {
        str(l.label, `links[${i}].label`);
        str(l.url, `links[${i}].url`);
        str(l.appContext, `links[${i}].appContext`);
      }
    });
  }
  if (Array.isArray(card.suggestions)) {
    card.suggestions.forEach((s: unknown, i) => {
      if (!isObj(s)) {
        return;
      }
      str(s.label, `suggestions[${i}].label`);
      if (Array.isArray(s.actions)) {
        s.actions.forEach((a: unknown, j) => {
          if (isObj(a)) {
            str(a.description, `suggestions[${i}].actions[${j}].description`);
            str(a.resourceId, `suggestions[${i}].actions[${j}].resourceId`);
            if (isObj(a.resource)) {
              resourceStrings(a.resource, `suggestions[${i}].actions[${j}].resource`, out);
            }
          }
        });
      }
    });
  }
  return out;
}

class Compiler {
  readonly problems: PackProblem[] = [];
  readonly letRefs = new Set<string>();
  /** No expression so far needed fhirpath.js by its form. */
  allFast = true;
  private readonly table;
  private readonly scope: ExprScope;
  private readonly letNames: Set<string>;
  private readonly valueSets: Map<string, ValueSetIndex>;
  /** Shared by the pack's expressions: their common call-constant subtrees are computed once. */
  private readonly keys = new SubtreeKeys();
  /** Characters of the pack's expressions so far (`EXPRESSION_LIMITS.packChars`). */
  private chars = 0;

  constructor(
    pack: RulePack,
    valueSets: Map<string, ValueSetIndex>,
    private readonly fastPath: boolean,
  ) {
    this.valueSets = valueSets;
    this.table = buildFunctionTable(valueSets);
    this.scope = packScope(pack);
    this.letNames = new Set(Object.keys(pack.let ?? {}));
  }

  /** Compiles one expression; records let references and problems. */
  expr(
    source: string,
    path: string,
    raw = false,
    base?: { line: number; column: number },
  ): CompiledFn {
    const before = this.chars;
    this.chars += expressionSize(source).size;
    if (this.chars > EXPRESSION_LIMITS.packChars) {
      if (before <= EXPRESSION_LIMITS.packChars) {
        this.problems.push({ path, message: PACK_CHARS_MESSAGE });
      }
      return () => [];
    }
    const analysis = analyzeExpression(source, this.scope);
    for (const v of analysis.variables) {
      if (this.letNames.has(v)) {
        this.letRefs.add(v);
      }
    }
    if (analysis.issues.length > 0) {
      for (const issue of analysis.issues) {
        this.problems.push({ path, message: formatIssue(issue, base) });
      }
      return () => [];
    }
    // The fast path (issue 6) where it can, fhirpath.js for the rest and as its fallback.
    const slow = compileExpression(source, this.table, raw);
    if (!this.fastPath) {
      this.allFast = false;
      return slow;
    }
    const fast = compileFast(source, {
      raw,
      valueSets: this.valueSets,
      ast: analysis.ast,
      keys: this.keys,
    });
    if (!fast) {
      this.allFast = false;
    }
    return withFallback(fast, slow);
  }

  text(source: string, path: string): CompiledText {
    if (!hasInterpolation(source)) {
      return { parts: [source] };
    }
    const parsed = parseTemplate(source);
    if (!parsed.ok) {
      this.problems.push({ path, message: parsed.message });
      return { parts: [source] };
    }
    const parts = parsed.parts.map((p) =>
      p.kind === 'text'
        ? p.text
        : this.expr(p.expr, path, false, { line: p.line, column: p.column }),
    );
    // One part that renders the whole text under CARD_TEXT_LIMIT (the engine joins parts
    // without a limit); a lone interpolation keeps its typed value, under the same limit.
    const text: CompiledText = { parts: [(root, vars) => [renderBounded(parts, root, vars)]] };
    const only = parts.length === 1 ? parts[0] : undefined;
    if (typeof only === 'function') {
      text.whole = (root, vars) => {
        const items = only(root, vars);
        if (jsonLongerThan(items, CARD_TEXT_LIMIT)) {
          throw new SafeEvalError(TEXT_TOO_LONG);
        }
        return items;
      };
    }
    return text;
  }

  value(v: unknown, path: string): CompiledValue {
    if (typeof v === 'string') {
      return hasInterpolation(v)
        ? { kind: 'text', text: this.text(v, path) }
        : { kind: 'static', value: v };
    }
    if (Array.isArray(v)) {
      return { kind: 'array', items: v.map((x, i) => this.value(x, `${path}[${i}]`)) };
    }
    if (isObj(v)) {
      return {
        kind: 'object',
        entries: Object.entries(v).map(([k, x]) => [k, this.value(x, `${path}.${k}`)]),
      };
    }
    return { kind: 'static', value: v };
  }

  card(card: CardTemplate, base: string): CompiledCard {
    const out: CompiledCard = {
      summary: this.text(card.summary, `${base}.summary`),
      template: card,
    };
    if (card.detail !== undefined) {
      out.detail = this.text(card.detail, `${base}.detail`);
    }
    if (card.links) {
      out.links = card.links.map((l, i) => {
        const p = `${base}.links[${i}]`;
        const link: NonNullable<CompiledCard['links']>[number] = {
          label: this.text(l.label, `${p}.label`),
          url: this.text(l.url, `${p}.url`),
        };
        if (l.appContext !== undefined) {
          link.appContext = this.text(l.appContext, `${p}.appContext`);
        }
        return link;
      });
    }
    if (card.suggestions) {
      out.suggestions = card.suggestions.map((s, i) => {
        const p = `${base}.suggestions[${i}]`;
        const sug: NonNullable<CompiledCard['suggestions']>[number] = {
          label: this.text(s.label, `${p}.label`),
        };
        if (s.actions) {
          sug.actions = s.actions.map((a, j) => {
            const ap = `${p}.actions[${j}]`;
            const act: CompiledAction = {
              type: a.type,
              description: this.text(a.description, `${ap}.description`),
            };
            if (a.resource !== undefined) {
              act.resource = checkedResourceId(this.value(a.resource, `${ap}.resource`));
            }
            if (a.resourceId !== undefined) {
              const rid = this.text(a.resourceId, `${ap}.resourceId`);
              act.resourceId = hasInterpolation(a.resourceId)
                ? checkedText(
                    rid,
                    RELATIVE_REFERENCE,
                    'not a relative reference Type/id after interpolation',
                  )
                : rid;
            }
            return act;
          });
        }
        return sug;
      });
    }
    return out;
  }

  takeLetRefs(): string[] {
    const refs = [...this.letRefs].sort();
    this.letRefs.clear();
    return refs;
  }
}

function compileRule(c: Compiler, rule: PackRule, index: number): CompiledRule {
  const base = `rules[${index}]`;
  c.takeLetRefs();
  const when = c.expr(rule.when, `${base}.when`);
  const card = c.card(rule.card, `${base}.card`);
  return { id: rule.id, service: rule.service, when, card, lets: c.takeLetRefs() };
}

/** The problem of a pack whose expressions together are over `EXPRESSION_LIMITS.packChars`. */
export const PACK_CHARS_MESSAGE = `the pack's expressions exceed ${EXPRESSION_LIMITS.packChars} characters in total (a number literal counts as ${EXPRESSION_LIMITS.numberWeight}); split the pack`;

/** Finds a cycle among lets, as `a -> b -> a`, or undefined. */
export function findLetCycle(deps: ReadonlyMap<string, readonly string[]>): string[] | undefined {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (name: string): string[] | undefined => {
    const s = state.get(name);
    if (s === 'done') {
      return undefined;
    }
    if (s === 'open') {
      return [...stack.slice(stack.indexOf(name)), name];
    }
    state.set(name, 'open');
    stack.push(name);
    for (const d of deps.get(name) ?? []) {
      const cycle = visit(d);
      if (cycle) {
        return cycle;
      }
    }
    stack.pop();
    state.set(name, 'done');
    return undefined;
  };
  for (const name of [...deps.keys()].sort()) {
    const cycle = visit(name);
    if (cycle) {
      return cycle;
    }
  }
  return undefined;
}

/**
 * Compiles a pack into a program (no caching). `fastPath: false` compiles every expression for
 * fhirpath.js only (the reference the fast path is checked against).
 * @throws PackValidationError if an expression or template does not compile or lets form a cycle.
 */
export function compileProgram(
  pack: RulePack,
  hash: string,
  opts: { fastPath?: boolean } = {},
): PackProgram {
  const steps = programSteps(pack, hash, opts.fastPath ?? true);
  for (;;) {
    const step = steps.next();
    if (step.done === true) {
      return step.value;
    }
  }
}

/**
 * compileProgram one let or rule at a time: it yields after each, so that a caller can spread
 * a big pack's compilation over several turns of the event loop (see compilePackInSlices).
 */
function* programSteps(
  pack: RulePack,
  hash: string,
  fastPath: boolean,
): Generator<undefined, PackProgram, undefined> {
  const valueSets = indexValueSets(pack.valueSets);
  const c = new Compiler(pack, valueSets, fastPath);
  const lets = new Map<string, CompiledLet>();
  for (const [name, source] of Object.entries(pack.let ?? {})) {
    yield;
    c.takeLetRefs();
    const fn = c.expr(source, `let.${name}`, true);
    lets.set(name, { name, fn, deps: c.takeLetRefs() });
  }
  const cycle = findLetCycle(new Map([...lets].map(([n, l]) => [n, l.deps])));
  if (cycle?.[0] !== undefined) {
    c.problems.push({
      path: `let.${cycle[0]}`,
      message: `lets form a cycle: ${cycle.join(' -> ')}`,
    });
  }
  const rules: CompiledRule[] = [];
  for (const [i, r] of pack.rules.entries()) {
    yield;
    rules.push(compileRule(c, r, i));
  }
  if (c.problems.length > 0) {
    throw new PackValidationError(c.problems);
  }
  return {
    hash,
    pack,
    lets,
    rules,
    rulesById: new Map(rules.map((r) => [r.id, r])),
    valueSets,
    allFast: c.allFast,
  };
}

/** A small LRU map. */
export class LruCache<V> {
  private readonly map = new Map<string, V>();
  constructor(private readonly max: number) {}
  get(key: string): V | undefined {
    const v = this.map.get(key);
    if (v !== undefined) {
      this.map.delete(key);
      this.map.set(key, v);
    }
    return v;
  }
  set(key: string, value: V): void {
    this.map.delete(key);
    this.map.set(key, value);
    while (this.map.size > this.max) {
      const oldest = this.map.keys().next();
      if (oldest.done === true) {
        break;
      }
      this.map.delete(oldest.value);
    }
  }
  get size(): number {
    return this.map.size;
  }
}

const programs = new LruCache<PackProgram>(32);
const compiledPacks = new LruCache<CompiledPack>(64);

/** The cached program of a pack hash, if this thread has compiled it. */
export function cachedProgram(hash: string): PackProgram | undefined {
  return programs.get(hash);
}

/**
 * The program of a pack with this hash, compiled on first use and cached by hash.
 * @throws PackValidationError if the pack does not compile.
 */
export function programFor(hash: string, pack: RulePack): PackProgram {
  let program = programs.get(hash);
  if (!program) {
    program = compileProgram(pack, hash);
    compileCounts.blocking++;
    programs.set(hash, program);
  }
  return program;
}

/** Programs compiled in this thread so far: in one block (programFor) and in slices. */
const compileCounts = { blocking: 0, sliced: 0 };

/**
 * How many programs this thread compiled in one block (`programFor`, `compilePack`) and in
 * slices (`compilePackInSlices`, `programInSlices`), for metrics and tests.
 */
export function threadCompileCounts(): { blocking: number; sliced: number } {
  return { ...compileCounts };
}

/**
 * How long a sliced compilation holds the thread before it lets the event loop run (ms). One
 * step (a let, a rule, a test of the pack when hashing) can take longer; the shipped pack's
 * largest are well under this.
 */
export const COMPILE_SLICE_MS = 4;

/** Runs `steps` to its end, letting the event loop run (setImmediate) every `sliceMs`. */
async function runInSlices<T>(
  steps: Generator<undefined, T, undefined>,
  sliceMs: number,
): Promise<T> {
  let sliceEnd = performance.now() + sliceMs;
  for (;;) {
    const step = steps.next();
    if (step.done === true) {
      return step.value;
    }
    if (performance.now() >= sliceEnd) {
      await new Promise<void>((resolve) => {
        setImmediate(resolve);
      });
      sliceEnd = performance.now() + sliceMs;
    }
  }
}

/** Freezes a pack like deepFreeze, yielding after each item of its top-level arrays. */
function* freezeSteps(pack: RulePack): Generator<undefined, RulePack, undefined> {
  for (const value of Object.values(pack as unknown as Record<string, unknown>)) {
    if (Array.isArray(value)) {
      for (const item of value) {
        deepFreeze(item);
        yield;
      }
    }
    deepFreeze(value);
    yield;
  }
  return deepFreeze(pack);
}

/** Sliced compilations running, by pack hash (callers of one hash share it). */
const slicedPrograms = new Map<string, Promise<PackProgram>>();

/** Sliced compilations running now (e.g. to bound how many are started off calls' paths). */
export function programsCompilingInSlices(): number {
  return slicedPrograms.size;
}

/**
 * {@link programFor} without holding the thread: the expressions are compiled a let or a rule
 * at a time, letting the event loop run every `sliceMs`, so that the calls in flight keep being
 * served while a big pack compiles. Cached like programFor's; one compilation per hash at a time.
 * @throws PackValidationError if the pack does not compile.
 */
export function programInSlices(
  hash: string,
  pack: RulePack,
  sliceMs = COMPILE_SLICE_MS,
): Promise<PackProgram> {
  const cached = programs.get(hash);
  if (cached) {
    return Promise.resolve(cached);
  }
  let running = slicedPrograms.get(hash);
  if (!running) {
    running = runInSlices(programSteps(pack, hash, true), sliceMs)
      .then((program) => {
        compileCounts.sliced++;
        programs.set(hash, program);
        return program;
      })
      .finally(() => {
        slicedPrograms.delete(hash);
      });
    slicedPrograms.set(hash, running);
  }
  return running;
}

/** Freezes `value` and everything reachable from it (a compiled pack is shared, never changed). */
export function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) {
      deepFreeze(v);
    }
  }
  return value;
}

/**
 * Compiles a pack already validated (e.g. loaded from the catalog): hashes its canonical
 * JSON and compiles every expression once; the result is cached by hash. The returned `pack`
 * is a frozen copy, so the hash keeps describing it.
 * @throws PackValidationError if an expression does not compile.
 */
export function compilePack(pack: RulePack): CompiledPack {
  const hash = packHash(pack);
  const cached = compiledPacks.get(hash);
  if (cached) {
    return cached;
  }
  const copy = deepFreeze(JSON.parse(JSON.stringify(pack)) as RulePack);
  programFor(hash, copy);
  const compiled: CompiledPack = Object.freeze({
    id: copy.id,
    version: copy.version,
    hash,
    pack: copy,
  });
  compiledPacks.set(hash, compiled);
  return compiled;
}

/**
 * {@link compilePack} without holding the thread (see programInSlices): hashing, freezing and
 * compiling go a piece at a time, letting the event loop run every `sliceMs`. It takes `pack`
 * over (frozen in place, not copied): for a pack just parsed, e.g. read from the catalog.
 * @throws PackValidationError if an expression does not compile.
 */
export async function compilePackInSlices(
  pack: RulePack,
  sliceMs = COMPILE_SLICE_MS,
): Promise<CompiledPack> {
  const hash = await runInSlices(packHashSteps(pack), sliceMs);
  const cached = compiledPacks.get(hash);
  if (cached) {
    return cached;
  }
  const frozen = await runInSlices(freezeSteps(pack), sliceMs);
  await programInSlices(hash, frozen, sliceMs);
  const again = compiledPacks.get(hash);
  if (again) {
    return again;
  }
  const compiled: CompiledPack = Object.freeze({
    id: frozen.id,
    version: frozen.version,
    hash,
    pack: frozen,
  });
  compiledPacks.set(hash, compiled);
  return compiled;
}
