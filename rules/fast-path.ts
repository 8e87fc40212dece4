/**
 * The FHIRPath fast path (issue 6): the subset of FHIRPath that rule packs use most, compiled
 * once into JavaScript closures, with fhirpath.js as the reference and the fallback.
 *
 * How it stays identical to fhirpath.js:
 * - It works on fhirpath.js's own values: ResourceNodes built by fhirpath.js's
 *   `util.makeChildResNodes` (same paths, FHIR types, choice types, `_x` extensions, decimals),
 *   and its FP_* date/quantity/decimal objects, whose own methods (`compare`, `minus`,
 *   `round`, `toString`, `convertData`, `TypeInfo.is`) do the value-level work. What the fast
 *   path replaces is fhirpath.js's interpreter: AST dispatch, context cloning per item,
 *   parameter marshalling. Its control flow mirrors fhirpath.js 5.2.2 function by function.
 * - Anything outside the subset (an unknown node type or function, a non-literal
 *   `inValueSet` argument, deep equality of objects, a variable carrying `__path__`, an object
 *   in a non-raw result...) is refused: at compile time (the expression always runs on
 *   fhirpath.js) or at run time (an internal `Unsupported` signal: the expression is evaluated
 *   again by fhirpath.js). Any other exception also falls back, so every error message is
 *   fhirpath.js's own.
 * - Raw results (lets) hold the same kinds of values fhirpath.js would, so a let computed here
 *   can be read by an expression that runs on fhirpath.js, and the other way round.
 *
 * What it adds (per call, keyed by the call's variables object): a child-node cache on each
 * ResourceNode (the prefetch is indexed by property once, dates are parsed once per node), one
 * wrapper per raw object, and common subexpression elimination: a subtree whose value depends
 * only on `%variables` and literals (`%now - 100 days`, `%activeMeds.medication...code` inside
 * a `where`) is computed once per call, shared by every expression of the call that contains
 * the same subtree.
 *
 * `spec/rules/fast-path.spec.ts` checks it against fhirpath.js on every expression of the
 * shipped pack over every Synthea patient, and on generated resources.
 */
import fhirpath from 'fhirpath';
import type { CompiledFn, ValueSetIndex } from './expression.ts';
import { anyInValueSet, R4_MODEL, SafeEvalError } from './expression.ts';

/* eslint-disable @typescript-eslint/no-unsafe-call, @typescript-eslint/no-unsafe-member-access, @typescript-eslint/no-unsafe-assignment, @typescript-eslint/no-unsafe-return, @typescript-eslint/no-explicit-any --
 * fhirpath.js's internal classes (ResourceNode, TypeInfo, FP_*) have no TypeScript types; they
 * are reached through values fhirpath.js returns and used exactly as fhirpath.js uses them. */

type Item = any;
type Items = Item[];

interface AstNode {
  type: string;
  text?: string;
  atRoot?: number;
  delimitedText?: string;
  value?: string;
  unit?: string;
  direction?: string;
  children?: AstNode[];
}

// ---------------------------------------------------------------------------------------------
// fhirpath.js internals, reached through values its public API returns.

interface Internals {
  ResourceNode: any;
  TypeInfo: any;
  FP_Type: any;
  FP_Quantity: any;
  FP_Date: any;
  FP_DateTime: any;
  FP_Time: any;
  getDecimal: (v: unknown) => any;
  util: any;
  ctx: { model: unknown; getDecimal: (v: unknown) => any; instanceSelectorTypeByData: null };
}

function rawEval(expr: string, root: object = {}): any {
  const out: unknown = fhirpath.evaluate(root, expr, {}, R4_MODEL, { resolveInternalTypes: false });
  return (out as any[])[0];
}

function probeInternals(): Internals | undefined {
  try {
    const node = rawEval('%context', { resourceType: 'Basic' });
    const decimal = rawEval('1.5');
    const FP_Type = Object.getPrototypeOf(fhirpath.FP_Decimal);
    const internals: Internals = {
      ResourceNode: node.constructor,
      TypeInfo: node.getTypeInfo().constructor,
      FP_Type,
      FP_Quantity: rawEval('1 day').constructor,
      FP_Date: rawEval('@2020-01-01').constructor,
      FP_DateTime: rawEval('@2020-01-01T00:00:00Z').constructor,
      FP_Time: rawEval('@T12:00:00').constructor,
      getDecimal: (v) => decimal.constructor.getDecimal(v),
      util: fhirpath.util,
      ctx: {
        model: R4_MODEL,
        getDecimal: (v) => decimal.constructor.getDecimal(v),
        instanceSelectorTypeByData: null,
      },
    };
    const ok =
      typeof internals.ResourceNode.makeResNode === 'function' &&
      typeof internals.TypeInfo.fromValue === 'function' &&
      typeof internals.util.makeChildResNodes === 'function' &&
      typeof internals.util.valDataConverted === 'function' &&
      decimal instanceof FP_Type &&
      fhirpath.version === '5.2.2';
    return ok ? internals : undefined;
  } catch {
    return undefined;
  }
}

const I = probeInternals();

/** Whether the fast path can run with this fhirpath.js (it mirrors 5.2.2). */
export const FAST_PATH_AVAILABLE = I !== undefined;

/** Counters (per thread), for specs and the bench. */
export const fastPathStats = { compiled: 0, refused: 0, fast: 0, fallbacks: 0 };

/**
 * `%now`, `%today` and the time of day of an instant, built the way fhirpath.js's
 * `toDateTime()`/`toDate()`/`toTime()` build them from the same strings (`checkString`), without
 * an expression evaluation each; undefined when the fast path is unavailable.
 */
export function fastInstantValues(
  now: Date,
): { now: unknown; today: unknown; timeOfDay: unknown } | undefined {
  if (!I) {
    return undefined;
  }
  const iso = now.toISOString();
  const v = {
    now: I.FP_DateTime.checkString(I.ctx, iso) as unknown,
    today: I.FP_Date.checkString(I.ctx, iso.slice(0, 10)) as unknown,
    timeOfDay: I.FP_Time.checkString(I.ctx, iso.slice(11, 23)) as unknown,
  };
  return v.now && v.today && v.timeOfDay ? v : undefined;
}

// ---------------------------------------------------------------------------------------------
// Signals.

/** Compile time: the expression is outside the subset. */
class Refused extends Error {}

/** Run time: this evaluation needs fhirpath.js. One shared instance: no stack per throw. */
class Unsupported extends Error {}
const UNSUPPORTED = new Unsupported('fast path: evaluate with fhirpath.js');

const boundaries = new Map<string, (items: Items) => Items>();

/** fhirpath.js's `lowBoundary()` / `highBoundary()` of a singleton, compiled once. */
function boundaryOf(name: 'lowBoundary' | 'highBoundary'): (items: Items) => Items {
  let fn = boundaries.get(name);
  if (!fn) {
    const compiled = fhirpath.compile(`%x.${name}()`, R4_MODEL, { resolveInternalTypes: false });
    fn = (items) => compiled({}, { x: items }) as Items;
    boundaries.set(name, fn);
  }
  return fn;
}

function unsupported(): never {
  throw UNSUPPORTED;
}

/**
 * The longest string an expression may build or return (characters). A longer one is a rule
 * error, on the fast path and on fhirpath.js alike (`withFallback`): building it is never left
 * to fhirpath.js, and a string built by doubling (`%s + %s`, 27 times: 134 million characters)
 * stops at the first step past the limit.
 */
export const STRING_LIMIT = 65_536;

/** A string past `STRING_LIMIT`: a rule error (PHI-free), never a fallback to fhirpath.js. */
class StringLimitError extends SafeEvalError {}
const STRING_TOO_LONG = new StringLimitError(
  `a string would be longer than ${STRING_LIMIT} characters`,
);

/** Refuses a string longer than `STRING_LIMIT`. */
function checkLength(length: number): void {
  if (length > STRING_LIMIT) {
    throw STRING_TOO_LONG;
  }
}

/** Refuses a result that holds a string longer than `STRING_LIMIT`. */
function checkResultStrings(items: readonly unknown[]): void {
  for (const v of items) {
    if (typeof v === 'string' && v.length > STRING_LIMIT) {
      throw STRING_TOO_LONG;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Guarded runs in the calling thread (issue 6).

/**
 * Thrown out of a run under `runGuarded` when the call must be evaluated in a worker instead:
 * an expression needs fhirpath.js (which cannot be interrupted), or the run used up its time
 * slice. Nothing of the run is kept; the worker evaluates the call from the start.
 */
export class HandOff extends Error {}
const HAND_OFF = new HandOff('evaluate this call in a worker');

/** Items processed between two looks at the clock during a guarded run. */
const FUEL_CHUNK = 4096;
/** Inside `runGuarded`: fhirpath.js must not run. */
let guarded = false;
/** The guarded run's end (performance.now()). */
let guardDeadline = 0;
/** Items left before the next look at the clock; Infinity outside a guarded run (never runs out). */
let fuel = Number.POSITIVE_INFINITY;

/**
 * Runs `f` (an evaluation over fast-path programs) in the calling thread with a time slice:
 * every loop of the fast path charges the items it processes, and every 4,096 items the clock
 * is read; past `sliceMs` the run throws `HandOff`. Within the run, an expression the fast path
 * cannot do throws `HandOff` instead of falling back to fhirpath.js. So the calling thread is
 * never held longer than about the slice, whatever the pack or the input.
 * @throws HandOff as above; whatever `f` throws otherwise.
 */
export function runGuarded<T>(sliceMs: number, f: () => T): T {
  if (guarded) {
    throw new Error('runGuarded cannot be nested');
  }
  guarded = true;
  guardDeadline = performance.now() + sliceMs;
  fuel = FUEL_CHUNK;
  try {
    return f();
  } finally {
    guarded = false;
    fuel = Number.POSITIVE_INFINITY;
  }
}

/** Counts `n` items of work against the guarded run's slice (outside one, fuel is infinite). */
function charge(n: number): void {
  if ((fuel -= n) < 0) {
    refuel();
  }
}

/**
 * Counts work over `length` characters of a string (reading, comparing, hashing, copying it):
 * one item per 64 characters, so a 64 KiB string costs what 1,024 items do.
 */
export function chargeText(length: number): void {
  if ((fuel -= length >>> 6) < 0) {
    refuel();
  }
}

function refuel(): void {
  if (performance.now() >= guardDeadline) {
    throw HAND_OFF;
  }
  fuel = FUEL_CHUNK;
}

// ---------------------------------------------------------------------------------------------
// Per-call state.

const KIDS_KEY = Symbol('cellcds.childKey');
const KIDS_VAL = Symbol('cellcds.children');
const KIDS_MORE = Symbol('cellcds.moreChildren');

interface CallCache {
  vars: Record<string, unknown>;
  processed: Map<string, Items>;
  wrappers: Map<object, Item>;
  roots: Map<unknown, Items>;
  memo: Map<SubtreeKey, MemoEntry>;
}

/** A call-constant subtree's value, and the `$index` its macros left behind (fhirpath.js leaks it). */
interface MemoEntry {
  items: Items;
  index: number | undefined;
  touched: boolean;
}

/** The call's cache lives on its variables object (created per call by the engine). */
const CALL = Symbol('cellcds.fastPathCall');

function callCacheFor(vars: Record<string, unknown>): CallCache {
  const holder = vars as Record<symbol, CallCache | undefined>;
  let c = holder[CALL];
  if (!c) {
    c = { vars, processed: new Map(), wrappers: new Map(), roots: new Map(), memo: new Map() };
    holder[CALL] = c;
  }
  return c;
}

interface Env {
  root: Items;
  $this: Items | undefined;
  $index: number | undefined;
  call: CallCache;
}

type Fn = (input: Items, env: Env) => Items;

const sub = (env: Env, t: Items): Env => ({
  root: env.root,
  $this: t,
  $index: env.$index,
  call: env.call,
});

// ---------------------------------------------------------------------------------------------
// Value helpers (each mirrors the fhirpath.js function named).

function internals(): Internals {
  if (!I) {
    unsupported();
  }
  return I;
}

/** util.arraify */
function arraify(x: unknown): Items {
  if (Array.isArray(x)) {
    return x;
  }
  return x !== null && x !== undefined ? [x] : [];
}

/** ExternalConstantTerm / applyParsedPath: wraps an object with `resourceType` in a node. */
function wrapVarItem(call: CallCache, i: Item): Item {
  if (i !== null && typeof i === 'object') {
    if (i.__path__) {
      unsupported();
    }
    if (i.resourceType) {
      if (i instanceof internals().ResourceNode) {
        return i;
      }
      return wrapperOf(call, i as object);
    }
  }
  return i;
}

function wrapperOf(call: CallCache, obj: object): Item {
  let w = call.wrappers.get(obj);
  if (w === undefined) {
    const { ResourceNode, ctx } = internals();
    w = ResourceNode.makeResNode(ctx, obj, null, null, null, null);
    call.wrappers.set(obj, w);
  }
  return w;
}

function variable(env: Env, name: string): Items {
  const call = env.call;
  const cached = call.processed.get(name);
  if (cached) {
    return cached;
  }
  if (!(name in call.vars)) {
    if (name === 'ucum') {
      return ['http://unitsofmeasure.org'];
    }
    unsupported();
  }
  const value: unknown = call.vars[name];
  charge(Array.isArray(value) ? value.length : 1);
  const processed = Array.isArray(value)
    ? value.map((i) => wrapVarItem(call, i))
    : wrapVarItem(call, value);
  const out =
    processed === undefined || processed === null
      ? []
      : Array.isArray(processed)
        ? processed
        : [processed];
  call.processed.set(name, out);
  return out;
}

function rootItems(call: CallCache, root: unknown): Items {
  let r = call.roots.get(root);
  if (!r) {
    r = arraify(root).map((i) => wrapVarItem(call, i));
    call.roots.set(root, r);
  }
  return r;
}

/**
 * A type test on a value, as fhirpath.js does it (`TypeInfo.fromValue(v).is/isConvertibleTo`),
 * memoized by the node's FHIR data type: a node's type info is derived from that alone.
 */
class TypeTest {
  private readonly memo = new Map<string, boolean>();
  constructor(
    private readonly target: any,
    private readonly kind: 'is' | 'convertible',
  ) {}

  private raw(v: Item): boolean {
    const ti = internals().TypeInfo.fromValue(v);
    return this.kind === 'is'
      ? Boolean(ti.is(this.target, R4_MODEL))
      : Boolean(ti.isConvertibleTo(this.target, R4_MODEL));
  }

  test(v: Item): boolean {
    if (v instanceof internals().ResourceNode) {
      const t = v.fhirNodeDataType as string | null;
      if (t) {
        let r = this.memo.get(t);
        if (r === undefined) {
          r = this.raw(v);
          this.memo.set(t, r);
        }
        return r;
      }
    }
    return this.raw(v);
  }
}

const memberTypeTests = new Map<string, TypeTest>();

/** What `util.makeChildResNodes` derives from the model for (parent path, property). */
interface ChildPlan {
  /** Non-choice: the child path and FHIR type. */
  path: string | null;
  type: string | null;
  /** `_key`: where FHIR JSON keeps a primitive's id and extensions. */
  extra: string;
  /** Choice element: candidates in model order. */
  choices?: Array<{ field: string; extra: string; path: string; type: string | null }>;
  /** The path when no choice candidate is present. */
  choiceNone?: { path: string; type: string | null };
}

const plans = new Map<string, Map<string, ChildPlan>>();

function modelLookup(map: unknown, key: string): any {
  // The model's maps are plain objects: a plain property read, as fhirpath.js does.
  return (map as Record<string, unknown>)[key];
}

function finishPath(childPath: string): { path: string; type: string | null } {
  const type = (modelLookup((R4_MODEL as any).path2Type, childPath) as string | undefined) ?? null;
  const path =
    (modelLookup((R4_MODEL as any).path2TypeWithoutElements, childPath) as string | undefined) ??
    childPath;
  return { path: path || childPath, type: type || null };
}

/** The plan for a child of a node with a path (memoized; the model never changes). */
function planFor(parentPath: string, key: string): ChildPlan {
  let byKey = plans.get(parentPath);
  if (!byKey) {
    byKey = new Map();
    plans.set(parentPath, byKey);
  }
  let plan = byKey.get(key);
  if (!plan) {
    let childPath = `${parentPath}.${key}`;
    childPath =
      (modelLookup((R4_MODEL as any).pathsDefinedElsewhere, childPath) as string | undefined) ||
      childPath;
    const actualTypes = modelLookup((R4_MODEL as any).choiceTypePaths, childPath) as
      string[] | undefined;
    if (actualTypes) {
      plan = {
        path: null,
        type: null,
        extra: `_${key}`,
        choices: actualTypes.map((t) => ({
          field: key + t,
          extra: `_${key}${t}`,
          ...finishPath(childPath + t),
        })),
        choiceNone: finishPath(childPath),
      };
    } else {
      plan = { ...finishPath(key === 'extension' ? 'Extension' : childPath), extra: `_${key}` };
    }
    byKey.set(key, plan);
  }
  return plan;
}

function isSome(x: unknown): boolean {
  return !(x === null || x === undefined || (Array.isArray(x) && x.length === 0));
}

/** util.makeChildResNodes, with the model lookups memoized per (parent path, property). */
function makeChildNodes(parent: Item, key: string): Items {
  const { ResourceNode, ctx } = internals();
  const data = parent.data;
  let childPath: string | null = null;
  let type: string | null = null;
  let toAdd: any;
  let _toAdd: any;
  if (parent.path) {
    const plan = planFor(parent.path as string, key);
    if (plan.choices) {
      const none = plan.choiceNone as { path: string; type: string | null };
      childPath = none.path;
      type = none.type;
      for (const c of plan.choices) {
        toAdd = data?.[c.field];
        _toAdd = data?.[c.extra];
        if (toAdd !== undefined || _toAdd !== undefined) {
          childPath = c.path;
          type = c.type;
          break;
        }
      }
    } else {
      toAdd = data?.[key];
      _toAdd = data?.[plan.extra];
      if (toAdd === undefined && _toAdd === undefined) {
        toAdd = parent._data?.[key];
      }
      childPath = plan.path;
      type = plan.type;
    }
  } else {
    toAdd = data?.[key];
    _toAdd = data?.[`_${key}`];
    if (toAdd === undefined && _toAdd === undefined) {
      toAdd = parent._data?.[key];
    }
  }
  if (!isSome(toAdd) && !isSome(_toAdd)) {
    return [];
  }
  if (Array.isArray(toAdd)) {
    const result: Items = new Array<Item>(toAdd.length);
    for (let i = 0; i < toAdd.length; i++) {
      result[i] = makeNode(
        ctx,
        ResourceNode,
        toAdd[i],
        parent,
        childPath,
        _toAdd && _toAdd[i],
        type,
        key,
        i,
      );
    }
    const extraLength: number = _toAdd?.length || 0;
    for (let i = toAdd.length; i < extraLength; ++i) {
      result.push(makeNode(ctx, ResourceNode, null, parent, childPath, _toAdd[i], type, key, i));
    }
    return result;
  }
  if ((toAdd === null || toAdd === undefined) && Array.isArray(_toAdd)) {
    const result: Items = new Array<Item>(_toAdd.length);
    for (let i = 0; i < _toAdd.length; i++) {
      result[i] = makeNode(ctx, ResourceNode, null, parent, childPath, _toAdd[i], type, key, i);
    }
    return result;
  }
  return [makeNode(ctx, ResourceNode, toAdd, parent, childPath, _toAdd, type, key, null)];
}

/** ResourceNode.makeResNode */
function makeNode(
  ctx: unknown,
  ResourceNode: any,
  data: unknown,
  parent: Item,
  path: string | null,
  extra: unknown,
  type: string | null,
  key: string,
  index: number | null,
): Item {
  return data instanceof ResourceNode
    ? data
    : new ResourceNode(ctx, data, parent, path, extra, type, key, index);
}

/**
 * The child nodes of `res` for `key`, built once per node: the first key navigated is kept in
 * two plain properties (most nodes are navigated by one key), others in a Map.
 */
function childrenOf(res: Item, key: string): Items {
  const firstKey = res[KIDS_KEY] as string | undefined;
  if (firstKey === key) {
    return res[KIDS_VAL] as Items;
  }
  if (firstKey === undefined) {
    const out = makeChildNodes(res, key);
    res[KIDS_KEY] = key;
    res[KIDS_VAL] = out;
    return out;
  }
  let more = res[KIDS_MORE] as Map<string, Items> | undefined;
  if (!more) {
    more = new Map();
    res[KIDS_MORE] = more;
  }
  let out = more.get(key);
  if (!out) {
    out = makeChildNodes(res, key);
    more.set(key, out);
  }
  return out;
}

/** engine.MemberInvocation */
function member(input: Items, key: string, atRoot: number | undefined, env: Env): Items {
  charge(input.length + 1);
  const { ResourceNode, TypeInfo, ctx } = internals();
  const result: Items = [];
  for (const item of input) {
    let res: Item;
    if (item instanceof ResourceNode) {
      res = item;
    } else if (item !== null && typeof item === 'object') {
      if (item.__path__) {
        unsupported();
      }
      res = wrapperOf(env.call, item as object);
    } else {
      res = ResourceNode.makeResNode(ctx, item, null, undefined, null, undefined);
    }
    if (res.data?.resourceType === key) {
      result.push(res);
      continue;
    }
    if (
      atRoot === 1 ||
      (atRoot === 2 &&
        (env.$index !== undefined
          ? env.root[env.$index] === env.$this?.[0]
          : env.root === env.$this))
    ) {
      let tt = memberTypeTests.get(key);
      if (!tt) {
        tt = new TypeTest(new TypeInfo({ name: key }), 'is');
        memberTypeTests.set(key, tt);
      }
      if (tt.test(res)) {
        result.push(res);
        continue;
      }
    }
    const kids = childrenOf(res, key);
    for (const k of kids) {
      result.push(k);
    }
  }
  return result;
}

/** misc.singleton(coll, type) for the types the subset uses. */
function singleton(coll: Items, type: 'Boolean' | 'Integer' | 'String'): Item {
  if (coll.length > 1) {
    unsupported();
  } else if (coll.length === 0) {
    return [];
  }
  const { util, FP_Quantity } = internals();
  const v = util.valData(coll[0]);
  if (v === null || v === undefined) {
    return [];
  }
  switch (type) {
    case 'Boolean':
      return v === true || v === false ? v : true;
    case 'String':
      if (typeof v === 'string') {
        return v;
      }
      return unsupported();
    case 'Integer': {
      if (v instanceof FP_Quantity) {
        unsupported();
      }
      const isInt =
        v instanceof fhirpath.FP_Decimal ? Boolean((v as any).isInteger()) : Number.isInteger(v);
      if (isInt) {
        return v;
      }
      return unsupported();
    }
  }
}

/** A JS string, or a ResourceNode whose converted data is a string and that has no `_x`. */
function stringOf(item: Item): string | undefined {
  if (typeof item === 'string') {
    return item;
  }
  if (item instanceof internals().ResourceNode) {
    const v = item.convertData();
    if (typeof v === 'string' && (item._data === null || item._data === undefined)) {
      return v;
    }
  }
  return undefined;
}

/** filtering.distinctFn, for collections of string-like items (else unsupported). */
function distinctStrings(items: Items): Items {
  charge(items.length);
  const seen = new Set<string>();
  const out: Items = [];
  for (const item of items) {
    const s = stringOf(item);
    if (s === undefined) {
      unsupported();
    }
    chargeText(s.length);
    if (!seen.has(s)) {
      seen.add(s);
      out.push(item);
    }
  }
  return out;
}

/** deepEqual for two singletons of strings/booleans (else unsupported). */
function equalSingletons(a: Items, b: Items): boolean {
  if (a.length !== 1 || b.length !== 1) {
    unsupported();
  }
  const { ResourceNode } = internals();
  const x = a[0];
  const y = b[0];
  const xn = x instanceof ResourceNode;
  const yn = y instanceof ResourceNode;
  const av = xn ? x.convertData() : x;
  const bv = yn ? y.convertData() : y;
  const ta = typeof av;
  const tb = typeof bv;
  if ((ta !== 'string' && ta !== 'boolean') || (tb !== 'string' && tb !== 'boolean')) {
    unsupported();
  }
  if (ta === 'string' && tb === 'string') {
    chargeText((av as string).length);
  }
  if (av !== bv) {
    return false;
  }
  if (!xn || !yn) {
    return true;
  }
  const xd = x._data;
  const yd = y._data;
  if (xd === null && yd === null) {
    return true;
  }
  if ((xd === null) !== (yd === null)) {
    return false;
  }
  return unsupported();
}

/** equality.typecheckScalars + the comparison operators. */
function compare(a: Items, b: Items, op: '<' | '>' | '<=' | '>='): Items {
  if (a.length === 0 || b.length === 0) {
    return [];
  }
  if (a.length !== 1 || b.length !== 1) {
    unsupported();
  }
  const { util, FP_Type } = internals();
  let a0 = util.valDataConverted(a[0]);
  let b0 = util.valDataConverted(b[0]);
  let exchanged = false;
  if (a0 !== null && a0 !== undefined && b0 !== null && b0 !== undefined) {
    const l = classForComparison(a0, FP_Type);
    const r = classForComparison(b0, FP_Type);
    if (l !== r) {
      if (l === Number && r === FP_Type) {
        exchanged = true;
      } else if (!(l === FP_Type && r === Number)) {
        unsupported();
      }
    }
  }
  if (exchanged) {
    [a0, b0] = [b0, a0];
  }
  if (a0 === null || a0 === undefined || b0 === null || b0 === undefined) {
    return [];
  }
  if (a0 instanceof FP_Type) {
    const c = a0.compare(b0) as number | null;
    if (c === null) {
      return [];
    }
    switch (op) {
      case '<':
        return [exchanged ? c > 0 : c < 0];
      case '>':
        return [exchanged ? c < 0 : c > 0];
      case '<=':
        return [exchanged ? c >= 0 : c <= 0];
      case '>=':
        return [exchanged ? c <= 0 : c >= 0];
    }
  }
  if (typeof a0 === 'string') {
    chargeText(a0.length);
  }
  switch (op) {
    case '<':
      return [a0 < b0];
    case '>':
      return [a0 > b0];
    case '<=':
      return [a0 <= b0];
    case '>=':
      return [a0 >= b0];
  }
}

function classForComparison(obj: any, FP_Type: any): unknown {
  return obj instanceof FP_Type ? FP_Type : typeof obj === 'bigint' ? Number : obj.constructor;
}

/** Singleton Boolean as the `and`/`or`/... operators take it: [] stays []. */
function boolParam(res: Items): Item {
  return res.length === 0 ? [] : singleton(res, 'Boolean');
}

/** logic.andOp / orOp / xorOp / impliesOp, verbatim. */
function andOp(a: Item, b: Item): Item {
  if (Array.isArray(b)) {
    if (a === true) {
      return [];
    } else if (a === false) {
      return false;
    } else if (Array.isArray(a)) {
      return [];
    }
  }
  if (Array.isArray(a)) {
    return b === true ? [] : false;
  }
  return a && b;
}

function orOp(a: Item, b: Item): Item {
  if (Array.isArray(b)) {
    if (a === true) {
      return true;
    } else if (a === false) {
      return [];
    } else if (Array.isArray(a)) {
      return [];
    }
  }
  if (Array.isArray(a)) {
    return b === true ? true : [];
  }
  return a || b;
}

function xorOp(a: Item, b: Item): Item {
  if (Array.isArray(a) || Array.isArray(b)) {
    return [];
  }
  return (a && !b) || (!a && b);
}

function impliesOp(a: Item, b: Item): Item {
  if (Array.isArray(b)) {
    if (a === true) {
      return [];
    } else if (a === false) {
      return true;
    } else if (Array.isArray(a)) {
      return [];
    }
  }
  if (Array.isArray(a)) {
    return b === true ? true : [];
  }
  if (a === false) {
    return true;
  }
  return a && b;
}

/** math.plus / math.minus for singletons (strings, FP types, decimals). */
function plusMinus(xs: Items, ys: Items, op: '+' | '-'): Items {
  if (xs.length === 0 || ys.length === 0) {
    return [];
  }
  if (xs.length !== 1 || ys.length !== 1) {
    unsupported();
  }
  const { util, FP_Type, getDecimal } = internals();
  const x = util.valDataConverted(xs[0]);
  const y = util.valDataConverted(ys[0]);
  if (x === null || x === undefined || y === null || y === undefined) {
    return [];
  }
  if (typeof x === 'bigint' || typeof y === 'bigint') {
    unsupported();
  }
  if (op === '+') {
    if (typeof x === 'string' && typeof y === 'string') {
      const length = x.length + y.length;
      checkLength(length);
      chargeText(length);
      return [x + y];
    }
    if (x instanceof FP_Type) {
      return arraify(x.plus(y));
    }
    if (y instanceof FP_Type) {
      return arraify(y.plus(x));
    }
    return arraify(getDecimal(x).plus(y));
  }
  if (x instanceof FP_Type) {
    return arraify(x.minus(y));
  }
  if (y instanceof FP_Type) {
    return arraify(y.negate().plus(x));
  }
  return arraify(getDecimal(x).minus(y));
}

/** A FHIR dateTime with seconds and a zone; group 1: its fraction of a second, if any. */
const ZONED_SECONDS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?(?:Z|[+-]\d{2}:\d{2})$/;

/**
 * Whether every key is a FHIR dateTime (as the model types it) with seconds, a zone and the
 * same number of fraction digits: then their low boundaries order them as they order
 * themselves, and tie where they tie.
 */
function sameDateTimeShape(keys: ReadonlyArray<{ key: Item }>): boolean {
  const { util, FP_DateTime } = internals();
  let fraction: number | undefined;
  for (const { key } of keys) {
    if (key === null || key === undefined) {
      return false;
    }
    const value: unknown = util.valDataConverted(key);
    if (!(value instanceof FP_DateTime)) {
      return false;
    }
    const text = String((value as { asStr?: unknown }).asStr);
    const m = ZONED_SECONDS.exec(text);
    if (!m) {
      return false;
    }
    const digits = m[1]?.length ?? 0;
    if (fraction === undefined) {
      fraction = digits;
    } else if (fraction !== digits) {
      return false;
    }
  }
  return true;
}

/** filtering.sort's compareValues. */
function compareValues(a: Item, b: Item): number {
  if ((a === null || a === undefined) && (b === null || b === undefined)) {
    return 0;
  }
  if (a === null || a === undefined) {
    return -1;
  }
  if (b === null || b === undefined) {
    return 1;
  }
  const { util, FP_Type } = internals();
  let a0 = util.valDataConverted(a);
  let b0 = util.valDataConverted(b);
  let exchanged = false;
  if (a0 !== null && a0 !== undefined && b0 !== null && b0 !== undefined) {
    const l = classForComparison(a0, FP_Type);
    const r = classForComparison(b0, FP_Type);
    if (l !== r) {
      if (l === Number && r === FP_Type) {
        exchanged = true;
      } else if (!(l === FP_Type && r === Number)) {
        unsupported();
      }
    }
  }
  if (exchanged) {
    [a0, b0] = [b0, a0];
  }
  if (a0 instanceof FP_Type) {
    const c = a0.compare(b0) as number | null;
    if (c === null) {
      unsupported();
    }
    return exchanged ? -c : c;
  }
  const ta = typeof a0;
  const tb = typeof b0;
  if (ta === 'object' || ta === 'function' || tb === 'object' || tb === 'function') {
    unsupported();
  }
  if (ta === 'string') {
    chargeText((a0 as string).length);
  }
  if (a0 === b0) {
    return 0;
  }
  return a0 < b0 ? -1 : a0 > b0 ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// The compiler.

function childAt(node: AstNode, i: number): AstNode {
  const c = node.children?.[i];
  if (!c) {
    throw new Refused(`${node.type} lacks child ${i}`);
  }
  return c;
}

/** fhirpath.js handleStringEscapes. */
function handleStringEscapes(str: string): string {
  return str.replace(/\\(u[0-9a-fA-F]{4}|.)/g, (_m: string, submatch: string) => {
    switch (_m) {
      case '\\r':
        return '\r';
      case '\\n':
        return '\n';
      case '\\t':
        return '\t';
      case '\\f':
        return '\f';
      default:
        return submatch.length > 1
          ? String.fromCharCode(parseInt(submatch.slice(1), 16))
          : submatch;
    }
  });
}

function stringLiteralVal(str: string): string {
  return str.length >= 2 && str.startsWith("'") && str.endsWith("'")
    ? handleStringEscapes(str.slice(1, -1))
    : str;
}

function identifierVal(str: string): string {
  return str.length >= 2 && str.startsWith('`') && str.endsWith('`')
    ? handleStringEscapes(str.slice(1, -1))
    : str;
}

/** The identity of a subtree's structure: one object per distinct structure (see SubtreeKeys). */
interface SubtreeKey {
  readonly id: number;
}

/**
 * Structural keys of subtrees (positions left out): two subtrees with the same key have the
 * same value in a call. Each distinct structure is interned once, and a node's key is built
 * from its own fields and its children's ids, so keying every node of an expression is linear
 * in its size (a key spelling out the whole subtree, rebuilt per node, made compiling a
 * 1,000-step chain take minutes). Keys are objects, compared by identity: keys of different
 * `SubtreeKeys` never collide. One instance serves all the expressions of a pack, so they share
 * their call-constant subtrees.
 */
export class SubtreeKeys {
  private readonly interned = new Map<string, SubtreeKey>();
  private readonly ofNode = new WeakMap<AstNode, SubtreeKey>();

  keyOf(node: AstNode): SubtreeKey {
    let key = this.ofNode.get(node);
    if (key) {
      return key;
    }
    let childIds = '';
    for (const c of node.children ?? []) {
      childIds += `${this.keyOf(c).id},`;
    }
    const local = `${node.type}\u0001${node.text ?? ''}\u0001${String(node.atRoot ?? '')}\u0001${
      node.delimitedText ?? ''
    }\u0001${node.value ?? ''}\u0001${node.unit ?? ''}\u0001${node.direction ?? ''}(${childIds})`;
    key = this.interned.get(local);
    if (!key) {
      key = { id: this.interned.size };
      this.interned.set(local, key);
    }
    this.ofNode.set(node, key);
    return key;
  }
}

/** The pinned time functions of the pack's function table, and the variable each reads. */
const TIME_FUNCTIONS: ReadonlyMap<string, string> = new Map([
  ['now', 'now'],
  ['today', 'today'],
  ['timeOfDay', '__timeOfDay'],
]);

interface CompileOptions {
  valueSets: ReadonlyMap<string, ValueSetIndex>;
  keys: SubtreeKeys;
}

type Safety = Readonly<{ safe: boolean; single: boolean }>;
const NOT_SAFE: Safety = { safe: false, single: false };
const SAFE_SINGLE: Safety = { safe: true, single: true };
const SAFE_MANY: Safety = { safe: true, single: false };

/**
 * Compiles one expression. Every analysis of a subtree (call-constant, safe, the variables it
 * reads, its key) is memoized per node, so compiling is linear in the expression's size: a
 * left-nested chain asked each level about its whole head, and a right-nested `and` asked
 * about its right side twice per level (exponential).
 */
class FastCompiler {
  private readonly constantMemo = new Map<AstNode, boolean>();
  private readonly safetyMemo = new Map<AstNode, Safety>();
  private readonly variablesMemo = new Map<AstNode, ReadonlySet<string>>();

  constructor(private readonly opts: CompileOptions) {}

  /**
   * Whether a subtree's value depends only on `%variables`, literals and pinned time functions
   * (not on the focus, `$this`, `$index` or the root): such a subtree is computed once per call.
   */
  isCallConstant(node: AstNode): boolean {
    let r = this.constantMemo.get(node);
    if (r === undefined) {
      r = this.callConstant(node);
      this.constantMemo.set(node, r);
    }
    return r;
  }

  private callConstant(node: AstNode): boolean {
    switch (node.type) {
      case 'EntireExpression':
      case 'TermExpression':
      case 'InvocationTerm':
      case 'ParenthesizedTerm':
      case 'LiteralTerm':
        return node.children?.length === 1
          ? this.isCallConstant(childAt(node, 0))
          : node.type === 'LiteralTerm';
      case 'ExternalConstantTerm':
      case 'StringLiteral':
      case 'BooleanLiteral':
      case 'NumberLiteral':
      case 'QuantityLiteral':
      case 'DateLiteral':
      case 'DateTimeLiteral':
      case 'NullLiteral':
        return true;
      case 'InvocationExpression': {
        const [head, ...rest] = node.children ?? [];
        return (
          head !== undefined &&
          this.isCallConstant(head) &&
          rest.every((r) => this.isConstantStep(r))
        );
      }
      case 'FunctionInvocation': {
        // At the head of a chain only the pinned time functions ignore their input.
        return TIME_FUNCTIONS.has(this.functionName(node));
      }
      case 'EqualityExpression':
      case 'InequalityExpression':
      case 'AndExpression':
      case 'OrExpression':
      case 'ImpliesExpression':
      case 'AdditiveExpression':
      case 'UnionExpression':
        return (node.children ?? []).every((c) => this.isCallConstant(c));
      default:
        return false;
    }
  }

  /** A step after a constant head: member access, or a function whose non-macro params are constant. */
  private isConstantStep(node: AstNode): boolean {
    if (node.type === 'MemberInvocation') {
      return true;
    }
    if (node.type !== 'FunctionInvocation') {
      return false;
    }
    const name = this.functionName(node);
    const macro = MACRO_PARAMS.get(name);
    return this.params(node).every((p, i) => macro?.includes(i) === true || this.isCallConstant(p));
  }

  /**
   * Whether fhirpath.js evaluates this subtree without ever throwing, to at most one item.
   * Conservative: navigation, filters and existence tests over them, value-set membership with
   * a known set, literals, `=`/`!=` with a string or boolean literal, `and`/`or` of such.
   * (Comparisons, arithmetic, `not()` of a collection, unions... can throw: not included.)
   */
  isSafeSingle(node: AstNode): boolean {
    const s = this.safety(node);
    return s.safe && s.single;
  }

  private safety(node: AstNode): Safety {
    let r = this.safetyMemo.get(node);
    if (r === undefined) {
      r = this.computeSafety(node);
      this.safetyMemo.set(node, r);
    }
    return r;
  }

  /** The `%variables` a subtree reads. */
  variablesOf(node: AstNode): ReadonlySet<string> {
    let r = this.variablesMemo.get(node);
    if (r === undefined) {
      const out = new Set<string>();
      if (node.type === 'ExternalConstantTerm') {
        out.add(
          node.delimitedText !== undefined
            ? stringLiteralVal(node.delimitedText)
            : (node.text ?? ''),
        );
      }
      for (const c of node.children ?? []) {
        for (const v of this.variablesOf(c)) {
          out.add(v);
        }
      }
      r = out;
      this.variablesMemo.set(node, r);
    }
    return r;
  }

  private computeSafety(node: AstNode): Safety {
    const no = NOT_SAFE;
    switch (node.type) {
      case 'EntireExpression':
      case 'TermExpression':
      case 'InvocationTerm':
      case 'ParenthesizedTerm':
        return node.children?.length === 1 ? this.safety(childAt(node, 0)) : no;
      case 'LiteralTerm':
        return node.children?.length === 1 ? this.safety(childAt(node, 0)) : SAFE_SINGLE;
      case 'StringLiteral':
      case 'BooleanLiteral':
      case 'NumberLiteral':
      case 'NullLiteral':
        return SAFE_SINGLE;
      case 'ExternalConstantTerm':
      case 'ThisInvocation':
      case 'MemberInvocation':
        return SAFE_MANY;
      case 'InvocationExpression': {
        const [head, ...steps] = node.children ?? [];
        if (!head) {
          return no;
        }
        let cur = this.safety(head);
        for (const step of steps) {
          if (!cur.safe) {
            return no;
          }
          cur = this.stepSafety(step, cur.single);
        }
        return cur;
      }
      case 'EqualityExpression': {
        if (node.text !== '=' && node.text !== '!=') {
          return no;
        }
        const [a, b] = node.children ?? [];
        const literal = (n: AstNode | undefined) =>
          n !== undefined && (literalString(n) !== undefined || literalBoolean(n));
        const sides = [a, b].map((n) => (n ? this.safety(n).safe : false));
        return sides.every(Boolean) && (literal(a) || literal(b)) ? SAFE_SINGLE : no;
      }
      case 'AndExpression':
      case 'OrExpression':
      case 'ImpliesExpression':
        return (node.children ?? []).length === 2 &&
          (node.children ?? []).every((c) => this.isSafeSingle(c))
          ? SAFE_SINGLE
          : no;
      default:
        return no;
    }
  }

  /** A chain step after a safe value (`single`: that value has at most one item). */
  private stepSafety(step: AstNode, single: boolean): Safety {
    const no = NOT_SAFE;
    if (step.type === 'MemberInvocation') {
      return SAFE_MANY;
    }
    if (step.type !== 'FunctionInvocation') {
      return no;
    }
    const name = this.functionName(step);
    const params = this.params(step);
    const safeParams = params.every((p) => this.safety(p).safe);
    switch (name) {
      case 'exists':
        return params.length <= 1 && safeParams ? SAFE_SINGLE : no;
      case 'empty':
      case 'count':
        return params.length === 0 ? SAFE_SINGLE : no;
      case 'first':
      case 'last':
        return params.length === 0 ? SAFE_SINGLE : no;
      case 'where':
      case 'ofType':
        return params.length === 1 && (name === 'ofType' || safeParams)
          ? { safe: true, single }
          : no;
      case 'select':
        return params.length === 1 && safeParams ? SAFE_MANY : no;
      case 'inValueSet': {
        const p = params[0];
        const lit = p ? literalString(p) : undefined;
        return params.length === 1 && lit !== undefined && this.opts.valueSets.has(lit)
          ? SAFE_SINGLE
          : no;
      }
      case 'not':
        // misc.singleton throws on more than one item; on one item it never does.
        return params.length === 0 && single ? SAFE_SINGLE : no;
      default:
        return no;
    }
  }

  /** `x` and `.lowBoundary()` of a key `x.lowBoundary()` (no precision), compiled; else undefined. */
  lowBoundaryBase(node: AstNode): { base: Fn; step: Fn } | undefined {
    const [inner, last] = node.children ?? [];
    if (
      node.type !== 'InvocationExpression' ||
      node.children?.length !== 2 ||
      inner === undefined ||
      last?.type !== 'FunctionInvocation' ||
      this.functionName(last) !== 'lowBoundary' ||
      this.params(last).length !== 0
    ) {
      return undefined;
    }
    return { base: this.compile(inner), step: this.compile(last) };
  }

  functionName(node: AstNode): string {
    const functn = childAt(node, 0);
    return identifierVal(functn.text ?? '');
  }

  params(node: AstNode): AstNode[] {
    const functn = childAt(node, 0);
    if (this.functionName(node) === 'sort') {
      return functn.children ?? [];
    }
    const list = (functn.children ?? []).find((c) => c.type === 'ParamList');
    return list?.children ?? [];
  }

  /** Compiles a node; call-constant subtrees with work in them are memoized per call. */
  compile(node: AstNode): Fn {
    const fn = this.compileNode(node);
    if (
      node.type !== 'ExternalConstantTerm' &&
      !node.type.endsWith('Literal') &&
      node.type !== 'LiteralTerm' &&
      node.type !== 'EntireExpression' &&
      node.type !== 'TermExpression' &&
      node.type !== 'InvocationTerm' &&
      this.isCallConstant(node)
    ) {
      const key = this.opts.keys.keyOf(node);
      return (input, env) => {
        const memo = env.call.memo;
        const hit = memo.get(key);
        if (hit) {
          if (hit.touched) {
            env.$index = hit.index;
          }
          return hit.items;
        }
        const before = env.$index;
        const items = fn(input, env);
        memo.set(key, { items, index: env.$index, touched: env.$index !== before });
        return items;
      };
    }
    return fn;
  }

  /** A non-macro parameter: evaluated from `$this` (or the root), as fhirpath.js's makeParam. */
  private param(node: AstNode): Fn {
    const f = this.compile(node);
    return (_input, env) => {
      if (env.$this === undefined) {
        return f(env.root, sub(env, env.root));
      }
      // fhirpath.js evaluates a parameter in a copy of the context: the same focus, and a
      // `$index` the parameter's macros may change without the caller seeing it.
      const saved = env.$index;
      const out = f(env.$this, env);
      env.$index = saved;
      return out;
    };
  }

  private compileNode(node: AstNode): Fn {
    switch (node.type) {
      case 'EntireExpression':
      case 'TermExpression':
      case 'InvocationTerm':
      case 'ParenthesizedTerm':
        return this.compile(childAt(node, 0));
      case 'LiteralTerm': {
        if (node.children?.length) {
          return this.compile(childAt(node, 0));
        }
        const v = [node.text];
        return () => v;
      }
      case 'StringLiteral': {
        const v = [stringLiteralVal(node.text ?? '')];
        return () => v;
      }
      case 'BooleanLiteral': {
        const v = [node.text === 'true'];
        return () => v;
      }
      case 'NumberLiteral': {
        const v = [internals().getDecimal(node.text)];
        return () => v;
      }
      case 'QuantityLiteral': {
        const { FP_Quantity, ctx, getDecimal } = internals();
        const v = [new FP_Quantity(ctx, getDecimal(node.value), node.unit)];
        return () => v;
      }
      case 'DateLiteral':
      case 'DateTimeLiteral': {
        const { FP_Date, FP_DateTime, ctx } = internals();
        const cls = node.type === 'DateLiteral' ? FP_Date : FP_DateTime;
        const d = cls.checkString(ctx, (node.text ?? '').slice(1));
        if (!d) {
          throw new Refused('invalid date literal');
        }
        const v = [d];
        return () => v;
      }
      case 'NullLiteral':
        return () => [];
      case 'ExternalConstantTerm': {
        const name =
          node.delimitedText !== undefined
            ? stringLiteralVal(node.delimitedText)
            : (node.text ?? '');
        return (_input, env) => variable(env, name);
      }
      case 'ThisInvocation':
        return (_input, env) => env.$this ?? env.root;
      case 'IndexInvocation':
        return (_input, env) => arraify(env.$index);
      case 'MemberInvocation': {
        const key = identifierVal(childAt(node, 0).text ?? '');
        const atRoot = node.atRoot;
        return (input, env) => member(input, key, atRoot, env);
      }
      case 'InvocationExpression': {
        const steps = (node.children ?? []).map((c) => this.compile(c));
        if (steps.length === 2) {
          const [a, b] = steps as [Fn, Fn];
          return (input, env) => b(a(input, env), env);
        }
        return (input, env) => steps.reduce((acc, f) => f(acc, env), input);
      }
      case 'IndexerExpression': {
        const coll = this.compile(childAt(node, 0));
        const idx = this.compile(childAt(node, 1));
        return (input, env) => {
          const c = coll(input, env);
          const i = idx(input, env);
          if (i.length === 0) {
            return [];
          }
          if (typeof i[0] === 'string') {
            chargeText(i[0].length);
          }
          const n = parseInt(i[0] as string);
          return Number.isFinite(n) && c.length > n && n >= 0 ? [c[n]] : [];
        };
      }
      case 'FunctionInvocation':
        return this.compileFunction(node);
      case 'EqualityExpression':
      case 'InequalityExpression':
      case 'AndExpression':
      case 'OrExpression':
      case 'ImpliesExpression':
      case 'AdditiveExpression':
      case 'UnionExpression':
        return this.compileOperator(node);
      default:
        throw new Refused(`node ${node.type}`);
    }
  }

  private compileOperator(node: AstNode): Fn {
    const op = node.type === 'UnionExpression' ? '|' : (node.text ?? '');
    const l = this.param(childAt(node, 0));
    const r = this.param(childAt(node, 1));
    switch (op) {
      case '=':
      case '!=': {
        const negate = op === '!=';
        return (input, env) => {
          const a = l(input, env);
          const b = r(input, env);
          if (a.length === 0 || b.length === 0) {
            return [];
          }
          const eq = equalSingletons(a, b);
          return [negate ? !eq : eq];
        };
      }
      case '<':
      case '>':
      case '<=':
      case '>=':
        return (input, env) => compare(l(input, env), r(input, env), op);
      case 'and':
      case 'or':
      case 'xor':
      case 'implies': {
        const f = op === 'and' ? andOp : op === 'or' ? orOp : op === 'xor' ? xorOp : impliesOp;
        // fhirpath.js evaluates both operands. When the right one can neither throw nor give
        // more than one item, its value cannot change `false and _`, `true or _` or
        // `false implies _`: it is not evaluated then.
        const right = childAt(node, 1);
        const decisive = this.isSafeSingle(right)
          ? op === 'or'
            ? true
            : op === 'xor'
              ? undefined
              : false
          : undefined;
        // An undefined variable is the one thing that makes a "safe" subtree throw.
        const needs = [...this.variablesOf(right)].filter((v) => v !== 'ucum');
        return (input, env) => {
          const a = boolParam(l(input, env));
          if (a === decisive && needs.every((v) => v in env.call.vars)) {
            return [op === 'implies' ? true : a];
          }
          const b = boolParam(r(input, env));
          return arraify(f(a, b));
        };
      }
      case '+':
      case '-':
        return (input, env) => plusMinus(l(input, env), r(input, env), op);
      case '|':
        return (input, env) => distinctStrings(l(input, env).concat(r(input, env)));
      default:
        throw new Refused(`operator ${op}`);
    }
  }

  /** An `Expr` parameter (run per item by `ItemScope`, or on the whole input for iif). */
  private macro(node: AstNode): Fn {
    return this.compile(node);
  }

  private compileFunction(node: AstNode): Fn {
    const name = this.functionName(node);
    const params = this.params(node);
    const n = params.length;
    const arity = (...allowed: number[]) => {
      if (!allowed.includes(n)) {
        throw new Refused(`${name} with ${n} parameters`);
      }
    };
    // User functions of the pack (expression.ts buildFunctionTable) come first, as in fhirpath.js.
    if (name === 'inValueSet') {
      arity(1);
      const p = params[0];
      const lit = p ? literalString(p) : undefined;
      const vs = lit !== undefined ? this.opts.valueSets.get(lit) : undefined;
      if (!vs) {
        throw new Refused('inValueSet needs a known value set literal');
      }
      return (input) => {
        if (input.length === 0) {
          return [];
        }
        charge(input.length);
        const { util } = internals();
        const values: unknown[] = new Array<unknown>(input.length);
        for (let i = 0; i < input.length; i++) {
          const v: unknown = util.valData(input[i]);
          if (typeof v === 'string') {
            chargeText(v.length);
          }
          values[i] = v;
        }
        return [anyInValueSet(values, vs)];
      };
    }
    const timeVar = TIME_FUNCTIONS.get(name);
    if (timeVar !== undefined) {
      arity(0);
      return (_input, env) => {
        const v = env.call.vars[timeVar];
        return v === undefined ? [] : [v];
      };
    }
    switch (name) {
      case 'exists': {
        arity(0, 1);
        if (n === 0) {
          return (input) => [input.length > 0];
        }
        const cond = this.macro(params[0] as AstNode);
        return (input, env) => [where(input, cond, env).length > 0];
      }
      case 'where': {
        arity(1);
        const cond = this.macro(params[0] as AstNode);
        return (input, env) => where(input, cond, env);
      }
      case 'all': {
        arity(1);
        const cond = this.macro(params[0] as AstNode);
        return (input, env) => {
          const { util } = internals();
          const scope = new ItemScope(env);
          for (let i = 0; i < input.length; i++) {
            env.$index = i;
            if (!util.isTrue(scope.run(cond, input[i], i))) {
              return [false];
            }
          }
          return [true];
        };
      }
      case 'select': {
        arity(1);
        const proj = this.macro(params[0] as AstNode);
        return (input, env) => {
          const out: Items = [];
          const scope = new ItemScope(env);
          for (let i = 0; i < input.length; i++) {
            env.$index = i;
            const vs = scope.run(proj, input[i], i);
            charge(vs.length);
            for (const v of vs) {
              out.push(v);
            }
          }
          return out;
        };
      }
      case 'empty':
        arity(0);
        return (input) => [input.length === 0];
      case 'not':
        arity(0);
        return (input) => {
          const d = singleton(input, 'Boolean');
          return typeof d === 'boolean' ? [!d] : [];
        };
      case 'count':
        arity(0);
        return (input) => [input.length];
      case 'first':
        arity(0);
        return (input) => arraify(input[0]);
      case 'last':
        arity(0);
        return (input) => arraify(input[input.length - 1]);
      case 'ofType': {
        arity(1);
        const tt = new TypeTest(typeSpecifier(params[0] as AstNode), 'convertible');
        return (input) => {
          charge(input.length);
          return input.filter((v) => tt.test(v));
        };
      }
      case 'combine': {
        arity(1);
        const other = this.param(params[0] as AstNode);
        return (input, env) => {
          const out = input.concat(other(input, env));
          charge(out.length);
          return out;
        };
      }
      case 'union': {
        arity(1);
        const other = this.param(params[0] as AstNode);
        return (input, env) => distinctStrings(input.concat(other(input, env)));
      }
      case 'intersect': {
        arity(1);
        const other = this.param(params[0] as AstNode);
        return (input, env) => {
          const coll2 = other(input, env);
          if (input.length === 0 || coll2.length === 0) {
            return [];
          }
          const wanted = new Set<string>();
          charge(coll2.length);
          for (const item of coll2) {
            const s = stringOf(item);
            if (s === undefined) {
              unsupported();
            }
            chargeText(s.length);
            wanted.add(s);
          }
          return distinctStrings(input).filter((item) => wanted.has(stringOf(item) as string));
        };
      }
      case 'distinct':
        arity(0);
        return (input) => (input.length === 0 ? [] : distinctStrings(input));
      case 'isDistinct':
        arity(0);
        return (input) => [
          input.length === (input.length === 0 ? 0 : distinctStrings(input).length),
        ];
      case 'iif': {
        arity(2, 3);
        const [c, a, b] = params.map((p) => this.macro(p)) as [Fn, Fn, Fn | undefined];
        // Each branch sees the whole input as $this (fhirpath.js arraify(data)).
        return (input, env) => {
          const { util } = internals();
          if (util.isTrue(c(input, sub(env, input)))) {
            return a(input, sub(env, input));
          }
          return b ? b(input, sub(env, input)) : [];
        };
      }
      case 'lowBoundary':
      case 'highBoundary': {
        // Without a precision only. A date/time value: its own method, as fhirpath.js's
        // boundary() calls it (its boundary and time-zone rules, exactly). Anything else
        // (decimals, a null boundary): fhirpath.js's function through a compiled expression.
        arity(0);
        const boundary = boundaryOf(name);
        return (input) => {
          if (input.length === 0) {
            return [];
          }
          if (input.length > 1) {
            unsupported();
          }
          const { util, FP_Date, FP_DateTime, FP_Time } = internals();
          const value: unknown = util.valDataConverted(input[0]);
          if (
            value instanceof FP_DateTime ||
            value instanceof FP_Date ||
            value instanceof FP_Time
          ) {
            const out: unknown = (value as Record<string, () => unknown>)[name]?.();
            if (out !== null && out !== undefined) {
              return [out];
            }
          }
          try {
            return boundary(input);
          } catch {
            // fhirpath.js's own error, raised where it says it (the fallback runs it).
            unsupported();
          }
        };
      }
      case 'toString':
        arity(0);
        return (input) => {
          if (input.length > 1) {
            unsupported();
          }
          if (input.length === 0) {
            return [];
          }
          const v = internals().util.valDataConverted(input[0]);
          const text: unknown = v?.toString();
          if (typeof text === 'string') {
            chargeText(text.length);
          }
          return arraify(text);
        };
      case 'substring': {
        arity(1, 2);
        const [s, l] = params.map((p) => this.param(p));
        return (input, env) => {
          const start = singleton((s as Fn)(input, env), 'Integer');
          const length = l ? singleton(l(input, env), 'Integer') : undefined;
          const str = singleton(input, 'String');
          if (isEmptyValue(str) || isEmptyValue(start)) {
            return [];
          }
          chargeText((str as string).length);
          const st = Number(start);
          if (st < 0 || st >= (str as string).length) {
            return [];
          }
          if (length === undefined || isEmptyValue(length)) {
            return [(str as string).substring(st)];
          }
          return [(str as string).substring(st, st + Number(length))];
        };
      }
      case 'round': {
        arity(0, 1);
        const p = params[0] ? this.param(params[0]) : undefined;
        return (input, env) => {
          const precision = p ? singleton(p(input, env), 'Integer') : undefined;
          if (Array.isArray(precision)) {
            // An empty precision: fhirpath.js would pass [] on; keep it on fhirpath.js.
            unsupported();
          }
          if (input.length === 0) {
            return [];
          }
          if (input.length !== 1) {
            unsupported();
          }
          const { util, FP_Type, getDecimal } = internals();
          const val = util.valDataConverted(input[0]);
          if (val === null || val === undefined) {
            return [];
          }
          if (val instanceof FP_Type) {
            return arraify(val.round(precision));
          }
          if (typeof val === 'number') {
            return arraify(getDecimal(val).round(precision));
          }
          return unsupported();
        };
      }
      case 'sort': {
        if (n === 0) {
          return (input) => {
            charge(input.length * Math.ceil(Math.log2(input.length + 1)));
            return input.slice().sort(compareValues);
          };
        }
        if (n !== 1) {
          throw new Refused('sort by several keys');
        }
        const arg = params[0] as AstNode;
        if (arg.type !== 'SortDirectionArgument' && arg.type !== 'SortArgument') {
          throw new Refused('sort argument');
        }
        const desc = arg.direction === 'desc';
        const keyNode = childAt(arg, 0);
        const keyFn = this.compile(keyNode);
        const bareFn = this.lowBoundaryBase(keyNode);
        return (input, env) => {
          if (input.length < 2) {
            return input.slice();
          }
          charge(input.length * Math.ceil(Math.log2(input.length + 1)));
          const keysBy = (fn: Fn) =>
            input.map((item) => {
              const t = [item];
              const r = fn(t, { root: env.root, $this: t, $index: undefined, call: env.call });
              if (r.length > 1) {
                unsupported();
              }
              return { item, key: r.length === 0 ? null : r[0] };
            });
          // `sort(x.lowBoundary())` where every x is a date-time of one and the same precision
          // with a zone: the boundaries (x padded to milliseconds) order the items exactly as
          // the values themselves do, equal where they are equal, so the values are the keys
          // (building each boundary costs more than the sort). Otherwise the boundaries.
          let decorated;
          if (!bareFn) {
            decorated = keysBy(keyFn);
          } else {
            // x once per item; its boundary only where the shapes differ.
            const bare = keysBy(bareFn.base);
            decorated = sameDateTimeShape(bare)
              ? bare
              : bare.map(({ item, key }) => {
                  const t = key === null ? [] : [key];
                  const r = bareFn.step(t, {
                    root: env.root,
                    $this: t,
                    $index: undefined,
                    call: env.call,
                  });
                  if (r.length > 1) {
                    unsupported();
                  }
                  return { item, key: r.length === 0 ? null : r[0] };
                });
          }
          decorated.sort((x, y) => {
            const c = compareValues(x.key, y.key);
            return desc ? -c : c;
          });
          return decorated.map((d) => d.item);
        };
      }
      default:
        throw new Refused(`function ${name}`);
    }
  }
}

/** Function parameters that are macros (`Expr`): evaluated per item, not from the focus. */
const MACRO_PARAMS: ReadonlyMap<string, readonly number[]> = new Map([
  ['exists', [0]],
  ['where', [0]],
  ['all', [0]],
  ['select', [0]],
  ['iif', [0, 1, 2]],
  ['sort', [0]],
]);

function isEmptyValue(x: unknown): boolean {
  return x === null || x === undefined || (Array.isArray(x) && x.length === 0);
}

const EMPTY: Items = [];

/**
 * The scope a macro parameter runs in for each item: fhirpath.js clones its context per item
 * with `$this = [item]` and `$index = i`; one environment and one focus array are reused here.
 * (Results are consumed before the next item, and nothing keeps them.)
 */
class ItemScope {
  private readonly focus: Items = [undefined];
  private readonly env: Env;

  constructor(outer: Env) {
    this.env = { root: outer.root, $this: this.focus, $index: undefined, call: outer.call };
  }

  run(f: Fn, x: Item, i: number): Items {
    charge(1);
    const e = this.env;
    e.$index = i;
    let t: Items;
    if (x === null || x === undefined) {
      t = EMPTY;
    } else if (Array.isArray(x)) {
      t = x;
    } else {
      this.focus[0] = x;
      t = this.focus;
    }
    e.$this = t;
    return f(t, e);
  }
}

/** filtering.whereMacro: keeps items whose condition's first value is truthy. */
function where(input: Items, cond: Fn, env: Env): Items {
  const out: Items = [];
  if (input.length === 0) {
    return out;
  }
  const scope = new ItemScope(env);
  for (let i = 0; i < input.length; i++) {
    env.$index = i;
    const x = input[i];
    if (scope.run(cond, x, i)[0]) {
      out.push(x);
    }
  }
  return out;
}

/** Whether a parameter is exactly one boolean literal. */
function literalBoolean(node: AstNode): boolean {
  let n: AstNode | undefined = node;
  while (
    n &&
    (n.type === 'TermExpression' || n.type === 'LiteralTerm') &&
    n.children?.length === 1
  ) {
    n = n.children[0];
  }
  return n?.type === 'BooleanLiteral';
}

/** The string of a parameter that is exactly one string literal. */
function literalString(node: AstNode): string | undefined {
  let n: AstNode | undefined = node;
  while (
    n &&
    (n.type === 'TermExpression' || n.type === 'LiteralTerm') &&
    n.children?.length === 1
  ) {
    n = n.children[0];
  }
  return n?.type === 'StringLiteral' ? stringLiteralVal(n.text ?? '') : undefined;
}

/** engine.TypeSpecifier: the type named by a parameter, validated against the model. */
function typeSpecifier(node: AstNode): unknown {
  const { TypeInfo } = internals();
  const ids = (node.text ?? '').split('.').map(identifierVal);
  let namespace: string | undefined;
  let name: string | undefined;
  if (ids.length === 2) {
    [namespace, name] = ids;
  } else if (ids.length === 1) {
    [name] = ids;
  } else {
    throw new Refused('type specifier');
  }
  const ti = new TypeInfo({ namespace, name });
  if (!ti.isValid(R4_MODEL)) {
    throw new Refused('unknown type');
  }
  return ti;
}

// ---------------------------------------------------------------------------------------------
// Results and the public API.

function rawResult(items: Items): unknown[] {
  const { ResourceNode } = internals();
  const out: unknown[] = [];
  for (const n of items) {
    if (n instanceof ResourceNode || (n !== null && n !== undefined)) {
      if (typeof n === 'string') {
        checkLength(n.length);
      }
      out.push(n);
    }
  }
  return out;
}

function resolvedResult(items: Items): unknown[] {
  const { ResourceNode, FP_Type } = internals();
  const out: unknown[] = [];
  for (const item of items) {
    let n = item instanceof ResourceNode ? item.data : item;
    if (n instanceof FP_Type) {
      n = n.toJSON();
    } else if (typeof n === 'bigint') {
      n = n.toString();
    }
    if (n !== null && n !== undefined) {
      if (typeof n === 'object') {
        // fhirpath.js would tag a returned element with hidden path data: leave it to it.
        unsupported();
      }
      if (typeof n === 'string') {
        checkLength(n.length);
      }
      out.push(n);
    }
  }
  return out;
}

/**
 * Compiles an expression for the fast path, or returns undefined if it is outside the subset
 * (or the fast path is unavailable). `ast`: fhirpath.js's parse of `expr`, if already at hand.
 * `keys`: shared by the expressions of a pack (they then share call-constant subtrees in a
 * call); by default the expression's own. The returned function throws when an evaluation
 * needs fhirpath.js (use `withFallback`).
 */
export function compileFast(
  expr: string,
  opts: {
    raw: boolean;
    valueSets: ReadonlyMap<string, ValueSetIndex>;
    ast?: unknown;
    keys?: SubtreeKeys;
  },
): CompiledFn | undefined {
  if (!I) {
    return undefined;
  }
  let fn: Fn;
  try {
    const ast = (opts.ast ?? fhirpath.parse(expr)) as AstNode;
    fn = new FastCompiler({
      valueSets: opts.valueSets,
      keys: opts.keys ?? new SubtreeKeys(),
    }).compile(ast);
  } catch {
    fastPathStats.refused++;
    return undefined;
  }
  fastPathStats.compiled++;
  const finish = opts.raw ? rawResult : resolvedResult;
  return (root, vars) => {
    const call = callCacheFor(vars);
    const r = rootItems(call, root);
    return finish(fn(r, { root: r, $this: undefined, $index: undefined, call }));
  };
}

/** fhirpath.js's evaluation, whose result may not hold a string past `STRING_LIMIT`. */
function slowChecked(slow: CompiledFn, root: unknown, vars: Record<string, unknown>): unknown[] {
  const out = slow(root, vars);
  checkResultStrings(out);
  return out;
}

/**
 * The fast path with fhirpath.js behind it: any evaluation the fast path cannot do (or that
 * throws) is done again by `slow`, whose result or error is the answer. Inside `runGuarded`,
 * where fhirpath.js must not run, that throws `HandOff` instead. A string past `STRING_LIMIT`
 * is an error on both: the fast path stops as it would build one (fhirpath.js does not get to
 * build it), and a fhirpath.js result holding one is refused.
 * @throws HandOff inside `runGuarded`; SafeEvalError for a string past the limit; whatever
 *   fhirpath.js throws otherwise.
 */
export function withFallback(fast: CompiledFn | undefined, slow: CompiledFn): CompiledFn {
  if (!fast) {
    return (root, vars) => {
      if (guarded) {
        throw HAND_OFF;
      }
      return slowChecked(slow, root, vars);
    };
  }
  return (root, vars) => {
    let out: unknown[];
    try {
      out = fast(root, vars);
    } catch (err) {
      if (guarded) {
        throw HAND_OFF;
      }
      if (err instanceof StringLimitError) {
        throw err;
      }
      fastPathStats.fallbacks++;
      return slowChecked(slow, root, vars);
    }
    fastPathStats.fast++;
    return out;
  };
}
