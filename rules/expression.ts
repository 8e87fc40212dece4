/**
 * FHIRPath for rule packs: the R4 model, static checks of an expression (syntax, functions,
 * `%variables`, type names) with line/column positions, `{{ }}` templates, the per-pack
 * function table (`inValueSet`, pinned `now()`/`today()`), and the string form of results.
 * Pure and synchronous: used by validation (main thread) and by the evaluation workers.
 */
import fhirpath from 'fhirpath';
import r4 from 'fhirpath/fhir-context/r4';
import type { Model, UserInvocationTable } from 'fhirpath';
import type { PackValueSet } from './types.ts';

/** The FHIR R4 model every pack expression is compiled against. */
export const R4_MODEL: Model = r4;

/** Type names (resources and data types) the R4 model knows. */
const R4_TYPES: ReadonlySet<string> = (r4 as Model & { availableTypes: Set<string> })
  .availableTypes;

/** Variables the engine provides to every expression (besides lets and value sets). */
export const ENGINE_VARIABLES: readonly string[] = [
  'context',
  'prefetch',
  'patient',
  'draftOrders',
  'selections',
  'now',
  'today',
];

/** Variables fhirpath.js itself provides and that need no configuration. */
const BUILTIN_VARIABLES: readonly string[] = ['ucum', 'factory'];

/** Names a `let` or value set may not take. */
export const RESERVED_NAMES: ReadonlySet<string> = new Set([
  ...ENGINE_VARIABLES,
  ...BUILTIN_VARIABLES,
  'terminologies',
  'fhirServerUrl',
  'resource',
  'rootResource',
  'sct',
  'loinc',
  'this',
  'index',
  'total',
]);

/** Functions the engine adds to (or pins in) fhirpath.js. */
export const ENGINE_FUNCTIONS: ReadonlySet<string> = new Set([
  'inValueSet',
  'now',
  'today',
  'timeOfDay',
]);

const SYSTEM_TYPES = new Set([
  'Boolean',
  'String',
  'Integer',
  'Long',
  'Decimal',
  'Date',
  'DateTime',
  'Time',
  'Quantity',
]);

/** A problem inside one expression; line and column are 1-based within the expression. */
export interface ExprIssue {
  message: string;
  line?: number;
  column?: number;
}

/** What the static check of one expression found. */
export interface ExprAnalysis {
  issues: ExprIssue[];
  /** `%names` the expression reads (engine variables, lets, value sets). */
  variables: Set<string>;
  /** fhirpath.js's parse tree (when it parsed), for the fast path to compile without parsing again. */
  ast?: unknown;
}

/** What an expression may refer to. */
export interface ExprScope {
  /** `let` names and value-set names of the pack (usable as `%name`). */
  names: ReadonlySet<string>;
  /** Value-set names (the only valid arguments of `inValueSet`). */
  valueSets: ReadonlySet<string>;
}

interface AstNode {
  type: string;
  text?: string;
  start?: { line: number; column: number };
  children?: AstNode[];
}

/** fhirpath.js parse error shape: `errors[i] = [recognizer, symbol, line, column0, message, exception]`. */
interface ParseErrorLike {
  message?: unknown;
  errors?: unknown;
}

const knownFunctionCache = new Map<string, boolean>();

/**
 * Whether fhirpath.js (or the engine) implements a function. fhirpath.js keeps its function
 * table private, so a name is probed once by invoking it on an empty collection: only an
 * unknown name makes it throw `Not implemented: <name>`.
 */
export function isKnownFunction(name: string): boolean {
  if (ENGINE_FUNCTIONS.has(name)) {
    return true;
  }
  const cached = knownFunctionCache.get(name);
  if (cached !== undefined) {
    return cached;
  }
  let known = true;
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    known = false;
  } else {
    // Wrong arity makes fhirpath.js warn on the console; the probe must stay quiet.
    const warn = console.warn;
    console.warn = () => undefined;
    try {
      void fhirpath.evaluate([], `{}.${name}()`, {}, R4_MODEL);
    } catch (err) {
      const msg = err instanceof Error ? err.message : '';
      // fhirpath.js looks functions up in a plain object, so `constructor` or `valueOf`
      // "exist" there and then fail with a TypeError; `toString` is a real function.
      known =
        msg !== `Not implemented: ${name}` &&
        !(err instanceof TypeError && name in Object.prototype);
    } finally {
      console.warn = warn;
    }
  }
  knownFunctionCache.set(name, known);
  return known;
}

function isKnownType(qualified: string): boolean {
  const parts = qualified.split('.');
  const name = parts[parts.length - 1] ?? '';
  const ns = parts.length > 1 ? parts[0] : undefined;
  if (ns === 'System') {
    return SYSTEM_TYPES.has(name);
  }
  if (ns !== undefined && ns !== 'FHIR') {
    return false;
  }
  return R4_TYPES.has(name) || (ns === undefined && SYSTEM_TYPES.has(name));
}

function unquoteIdentifier(text: string): string {
  if (text.length >= 2 && (text.startsWith('`') || text.startsWith("'"))) {
    return text.slice(1, -1);
  }
  return text;
}

function shortParserMessage(message: string): string {
  const cut = message.indexOf(' expecting {');
  return (cut >= 0 ? message.slice(0, cut) : message).trim();
}

/** Turns a fhirpath.js parse exception into issues with 1-based positions. */
function parseIssues(err: unknown): ExprIssue[] {
  const e = err as ParseErrorLike;
  if (Array.isArray(e.errors) && e.errors.length > 0) {
    const issues: ExprIssue[] = [];
    for (const item of e.errors as unknown[]) {
      if (!Array.isArray(item)) {
        continue;
      }
      const [, , line, column, message] = item as [unknown, unknown, unknown, unknown, unknown];
      issues.push({
        message: `syntax error: ${shortParserMessage(typeof message === 'string' ? message : 'invalid expression')}`,
        line: typeof line === 'number' ? line : undefined,
        column: typeof column === 'number' ? column + 1 : undefined,
      });
    }
    if (issues.length > 0) {
      return issues.slice(0, 1);
    }
  }
  return [{ message: 'syntax error: invalid expression' }];
}

function firstIdentifier(node: AstNode): AstNode | undefined {
  if (node.type === 'Identifier') {
    return node;
  }
  for (const child of node.children ?? []) {
    const found = firstIdentifier(child);
    if (found) {
      return found;
    }
  }
  return undefined;
}

/** The string literal of a parameter node, when the parameter is exactly one literal. */
function stringLiteralOf(param: AstNode | undefined): string | undefined {
  let node = param;
  while (node && (node.type === 'TermExpression' || node.type === 'LiteralTerm')) {
    if (node.children?.length !== 1) {
      return undefined;
    }
    node = node.children[0];
  }
  if (node?.type === 'StringLiteral' && typeof node.text === 'string') {
    return unquoteIdentifier(node.text).replace(/\\(.)/g, '$1');
  }
  return undefined;
}

/** The type name given to `ofType(X)` / `is(X)` / `as(X)`, when it is a plain identifier. */
function typeParamOf(param: AstNode | undefined): { name: string; node: AstNode } | undefined {
  if (param?.type !== 'TermExpression' || typeof param.text !== 'string') {
    return undefined;
  }
  if (!/^[A-Za-z_][A-Za-z0-9_.]*$/.test(param.text)) {
    return undefined;
  }
  const id = firstIdentifier(param);
  return id ? { name: param.text, node: id } : undefined;
}

/** Whether the invocation's receiver is a `%variable` whose own functions we cannot list. */
function isOpaqueReceiver(receiver: AstNode | undefined): boolean {
  if (!receiver) {
    return false;
  }
  const term = receiver.type === 'TermExpression' ? receiver.children?.[0] : undefined;
  if (term?.type !== 'ExternalConstantTerm') {
    return false;
  }
  const id = firstIdentifier(term);
  return (
    id !== undefined && ['factory', 'terminologies'].includes(unquoteIdentifier(id.text ?? ''))
  );
}

interface WalkState {
  issues: ExprIssue[];
  variables: Set<string>;
  defined: Set<string>;
  scope: ExprScope;
}

function pos(node: AstNode | undefined): { line?: number; column?: number } {
  return node?.start ? { line: node.start.line, column: node.start.column } : {};
}

function checkFunction(node: AstNode, receiver: AstNode | undefined, st: WalkState): void {
  const functn = node.children?.[0];
  const id = functn?.children?.find((c) => c.type === 'Identifier');
  const name = unquoteIdentifier(id?.text ?? node.text ?? '');
  const params = functn?.children?.find((c) => c.type === 'ParamList')?.children ?? [];
  if (isOpaqueReceiver(receiver)) {
    return;
  }
  if (!isKnownFunction(name)) {
    st.issues.push({ message: `unknown function '${name}'`, ...pos(id ?? node) });
    return;
  }
  if (name === 'inValueSet') {
    const vs = stringLiteralOf(params[0]);
    if (params.length !== 1 || vs === undefined) {
      st.issues.push({
        message:
          "inValueSet takes one value-set name as a string literal, e.g. inValueSet('nsaids')",
        ...pos(id ?? node),
      });
    } else if (!st.scope.valueSets.has(vs)) {
      st.issues.push({ message: `unknown value set '${vs}'`, ...pos(id ?? node) });
    }
  } else if (name === 'defineVariable') {
    const v = stringLiteralOf(params[0]);
    if (v !== undefined) {
      st.defined.add(v);
    }
  } else if (name === 'ofType' || name === 'is' || name === 'as') {
    const t = typeParamOf(params[0]);
    if (t && !isKnownType(t.name)) {
      st.issues.push({ message: `unknown type '${t.name}'`, ...pos(t.node) });
    }
  }
}

function walk(node: AstNode, st: WalkState): void {
  switch (node.type) {
    case 'InvocationExpression': {
      const [receiver, invocation] = node.children ?? [];
      if (receiver) {
        walk(receiver, st);
      }
      if (invocation?.type === 'FunctionInvocation') {
        checkFunction(invocation, receiver, st);
        walkChildren(invocation, st);
      } else if (invocation) {
        walk(invocation, st);
      }
      return;
    }
    case 'FunctionInvocation':
      checkFunction(node, undefined, st);
      walkChildren(node, st);
      return;
    case 'ExternalConstantTerm': {
      const id = firstIdentifier(node);
      const raw = id?.text ?? node.text ?? '';
      const name = unquoteIdentifier(raw);
      st.variables.add(name);
      const known =
        ENGINE_VARIABLES.includes(name) ||
        BUILTIN_VARIABLES.includes(name) ||
        st.scope.names.has(name) ||
        st.defined.has(name);
      if (!known) {
        st.issues.push({ message: `unknown variable '%${name}'`, ...pos(node) });
      }
      return;
    }
    case 'TypeSpecifier': {
      const ids = (node.children?.[0]?.children ?? []).filter((c) => c.type === 'Identifier');
      const name = ids.map((i) => unquoteIdentifier(i.text ?? '')).join('.');
      if (name && !isKnownType(name)) {
        st.issues.push({ message: `unknown type '${name}'`, ...pos(ids[0]) });
      }
      return;
    }
    default:
      walkChildren(node, st);
  }
}

function walkChildren(node: AstNode, st: WalkState): void {
  for (const child of node.children ?? []) {
    walk(child, st);
  }
}

/**
 * Statically checks one FHIRPath expression: syntax (with the parser's position), unknown
 * functions, unknown `%variables`, unknown type names and `inValueSet` arguments.
 * Never throws.
 */
export function analyzeExpression(expr: string, scope: ExprScope): ExprAnalysis {
  const variables = new Set<string>();
  if (expr.trim() === '') {
    return { issues: [{ message: 'empty expression' }], variables };
  }
  let ast: AstNode;
  try {
    ast = fhirpath.parse(expr) as AstNode;
  } catch (err) {
    return { issues: parseIssues(err), variables };
  }
  const st: WalkState = { issues: [], variables, defined: new Set(), scope };
  walk(ast, st);
  // defineVariable names are only known once the whole expression was walked.
  st.issues = st.issues.filter((i) => {
    const m = /^unknown variable '%(.+)'$/.exec(i.message);
    return !(m?.[1] !== undefined && st.defined.has(m[1]));
  });
  return { issues: st.issues, variables, ast };
}

/** Formats an issue's position: `at column 17` on the first line, else `at line 2, column 5`. */
export function formatIssue(issue: ExprIssue, base?: { line: number; column: number }): string {
  if (issue.column === undefined) {
    return issue.message;
  }
  let line = issue.line ?? 1;
  let column = issue.column;
  if (base) {
    if (line === 1) {
      column = base.column + column - 1;
    }
    line = base.line + line - 1;
  }
  return line === 1
    ? `${issue.message} at column ${column}`
    : `${issue.message} at line ${line}, column ${column}`;
}

// ---------------------------------------------------------------------------------------------
// Templates: text with {{ FHIRPath }} interpolations.

/** One piece of a template: literal text, or an expression with its position in the text. */
export type TemplatePart =
  { kind: 'text'; text: string } | { kind: 'expr'; expr: string; line: number; column: number };

/** A parsed template, or the first syntax problem in it. */
export type ParsedTemplate = { ok: true; parts: TemplatePart[] } | { ok: false; message: string };

function lineColumnAt(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}

/** Whether a string contains an interpolation opener. */
export function hasInterpolation(text: string): boolean {
  return text.includes('{{');
}

/**
 * Splits a template into text and `{{ expr }}` parts. An expression ends at the first `}}`.
 * Text without `{{` is a single text part (the identity).
 */
export function parseTemplate(text: string): ParsedTemplate {
  const parts: TemplatePart[] = [];
  let at = 0;
  for (;;) {
    const open = text.indexOf('{{', at);
    if (open < 0) {
      if (at < text.length || parts.length === 0) {
        parts.push({ kind: 'text', text: text.slice(at) });
      }
      return { ok: true, parts };
    }
    if (open > at) {
      parts.push({ kind: 'text', text: text.slice(at, open) });
    }
    const close = text.indexOf('}}', open + 2);
    const where = lineColumnAt(text, open);
    const whereText =
      where.line === 1 ? `column ${where.column}` : `line ${where.line}, column ${where.column}`;
    if (close < 0) {
      return { ok: false, message: `unterminated {{ at ${whereText}` };
    }
    const expr = text.slice(open + 2, close);
    if (expr.trim() === '') {
      return { ok: false, message: `empty {{ }} at ${whereText}` };
    }
    parts.push({ kind: 'expr', expr, ...lineColumnAt(text, open + 2) });
    at = close + 2;
  }
}

/** The literal text of a template (interpolations removed), for static length checks. */
export function staticText(parts: readonly TemplatePart[]): string {
  return parts.map((p) => (p.kind === 'text' ? p.text : '')).join('');
}

// ---------------------------------------------------------------------------------------------
// Value sets and the per-pack function table.

/** Codes of a value set, indexed for membership tests. */
export interface ValueSetIndex {
  /** `system|code` pairs. */
  pairs: Set<string>;
  /** Codes alone (for bare code strings and Codings without a system). */
  codes: Set<string>;
  /** The codes in pack order, as the `%name` variable. */
  list: string[];
  /**
   * system -> codes, the same test as `pairs` without building a string per Coding. Set only
   * when no system or code of the set contains `|` (then `system|code` is unambiguous and the
   * two tests agree on every input).
   */
  bySystem?: Map<string, Set<string>>;
}

/** Indexes a pack's value sets by name. */
export function indexValueSets(
  valueSets: Record<string, PackValueSet> | undefined,
): Map<string, ValueSetIndex> {
  const out = new Map<string, ValueSetIndex>();
  for (const [name, vs] of Object.entries(valueSets ?? {})) {
    const index: ValueSetIndex = { pairs: new Set(), codes: new Set(), list: [] };
    const bySystem = new Map<string, Set<string>>();
    let unambiguous = true;
    for (const c of vs.codes) {
      index.pairs.add(`${c.system}|${c.code}`);
      index.codes.add(c.code);
      index.list.push(c.code);
      unambiguous &&= !c.system.includes('|') && !c.code.includes('|');
      let codes = bySystem.get(c.system);
      if (!codes) {
        codes = new Set();
        bySystem.set(c.system, codes);
      }
      codes.add(c.code);
    }
    if (unambiguous) {
      index.bySystem = bySystem;
    }
    out.set(name, index);
  }
  return out;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function codingMatches(coding: Record<string, unknown>, vs: ValueSetIndex): boolean {
  const code = coding.code;
  if (typeof code !== 'string') {
    return false;
  }
  if (typeof coding.system !== 'string') {
    return vs.codes.has(code);
  }
  return vs.bySystem
    ? vs.bySystem.get(coding.system)?.has(code) === true
    : vs.pairs.has(`${coding.system}|${code}`);
}

/**
 * Whether any item of a collection is in the value set: a code string matches by code; a
 * Coding by system and code (by code alone if it has no system); a CodeableConcept if any of
 * its codings matches.
 */
export function anyInValueSet(items: readonly unknown[], vs: ValueSetIndex): boolean {
  for (const item of items) {
    if (typeof item === 'string') {
      if (vs.codes.has(item)) {
        return true;
      }
    } else if (isRecord(item)) {
      if (Array.isArray(item.coding)) {
        if (item.coding.some((c) => isRecord(c) && codingMatches(c, vs))) {
          return true;
        }
      } else if (codingMatches(item, vs)) {
        return true;
      }
    }
  }
  return false;
}

interface EvalCtxLike {
  vars?: Record<string, unknown>;
}

/**
 * The function table of a pack: `inValueSet('name')` over its value sets, and `now()`,
 * `today()`, `timeOfDay()` pinned to the call's `%now` so that evaluation is reproducible.
 * `inValueSet` on an empty collection is empty (FHIRPath's usual propagation).
 */
export function buildFunctionTable(valueSets: Map<string, ValueSetIndex>): UserInvocationTable {
  const pinned = (varName: string) =>
    function (this: EvalCtxLike): unknown[] {
      const v = this.vars?.[varName];
      return v === undefined ? [] : [v];
    };
  return {
    inValueSet: {
      fn: (items: unknown[], name: unknown): unknown[] => {
        const vs = typeof name === 'string' ? valueSets.get(name) : undefined;
        if (!vs) {
          throw new SafeEvalError('inValueSet: unknown value set');
        }
        return items.length === 0 ? [] : [anyInValueSet(items, vs)];
      },
      arity: { 1: ['String'] },
    },
    now: { fn: pinned('now'), arity: { 0: [] }, internalStructures: true },
    today: { fn: pinned('today'), arity: { 0: [] }, internalStructures: true },
    timeOfDay: { fn: pinned('__timeOfDay'), arity: { 0: [] }, internalStructures: true },
  };
}

/** A compiled expression: `(root, vars) => result collection`. */
export type CompiledFn = (root: unknown, vars: Record<string, unknown>) => unknown[];

/**
 * Compiles an expression against R4 with the pack's function table.
 * `raw` keeps fhirpath.js internal types (ResourceNodes, FP dates): used for `let` values,
 * which are passed on to other expressions as variables without losing their FHIR types.
 * @throws Error if the expression does not parse (callers analyze first).
 */
export function compileExpression(
  expr: string,
  table: UserInvocationTable,
  raw = false,
): CompiledFn {
  const fn = fhirpath.compile(expr, R4_MODEL, {
    userInvocationTable: table,
    resolveInternalTypes: !raw,
    // trace() must never print call data (PHI) to a log.
    traceFn: () => undefined,
  });
  return (root, vars) => {
    const out = fn(root, vars) as unknown;
    if (out instanceof Promise) {
      throw new SafeEvalError('asynchronous functions are not supported');
    }
    return out as unknown[];
  };
}

const toFhirDateTime = fhirpath.compile('%s.toDateTime()', R4_MODEL, {
  resolveInternalTypes: false,
});
const toFhirDate = fhirpath.compile('%s.toDate()', R4_MODEL, { resolveInternalTypes: false });
const toFhirTime = fhirpath.compile('%s.toTime()', R4_MODEL, { resolveInternalTypes: false });

/** FHIRPath values of the evaluation instant: `%now` (dateTime), `%today` (UTC date), time of day. */
export function instantValues(now: Date): { now: unknown; today: unknown; timeOfDay: unknown } {
  const iso = now.toISOString();
  const first = (r: unknown): unknown => (Array.isArray(r) ? r[0] : undefined);
  return {
    now: first(toFhirDateTime({}, { s: iso })),
    today: first(toFhirDate({}, { s: iso.slice(0, 10) })),
    timeOfDay: first(toFhirTime({}, { s: iso.slice(11, 23) })),
  };
}

// ---------------------------------------------------------------------------------------------
// String form of results.

function joinDefined(parts: unknown[], sep: string): string | undefined {
  const s = parts.filter((p): p is string => typeof p === 'string' && p !== '').join(sep);
  return s === '' ? undefined : s;
}

function complexText(v: Record<string, unknown>): string | undefined {
  if (typeof v.value === 'number' || typeof v.value === 'string') {
    // Quantity (and Money): "25 mL/min".
    const unit =
      typeof v.unit === 'string' ? v.unit : typeof v.code === 'string' ? v.code : undefined;
    return unit ? `${String(v.value)} ${unit}` : String(v.value);
  }
  if (Array.isArray(v.coding) || typeof v.text === 'string') {
    // CodeableConcept, HumanName, Narrative-less elements with text.
    if (typeof v.text === 'string') {
      return v.text;
    }
    const first = (v.coding as unknown[]).find(isRecord);
    return first ? complexText(first) : undefined;
  }
  if (typeof v.code === 'string') {
    // Coding.
    return typeof v.display === 'string' ? v.display : v.code;
  }
  if (typeof v.display === 'string' || typeof v.reference === 'string') {
    return (v.display ?? v.reference) as string;
  }
  if (Array.isArray(v.given) || typeof v.family === 'string') {
    return joinDefined([...(Array.isArray(v.given) ? (v.given as unknown[]) : []), v.family], ' ');
  }
  return undefined;
}

/**
 * The text of one result item: primitives as FHIRPath prints them, Quantity as `value unit`,
 * Coding as display or code, CodeableConcept as text or its first coding, Reference as
 * display or reference, HumanName as given + family.
 * @throws Error (PHI-free) for other complex values.
 */
export function itemText(item: unknown): string {
  if (typeof item === 'string') {
    return item;
  }
  if (typeof item === 'number' || typeof item === 'boolean' || typeof item === 'bigint') {
    return String(item);
  }
  if (isRecord(item)) {
    const t = complexText(item);
    if (t !== undefined) {
      return t;
    }
  }
  throw new SafeEvalError('interpolation returned a complex value; select a primitive element');
}

/** The text of a result collection: items joined with ", " (empty collection = ""). */
export function collectionText(items: readonly unknown[]): string {
  return items.map(itemText).join(', ');
}

/** A failure raised by the engine itself, whose message is known to be PHI-free. */
export class SafeEvalError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * A PHI-free description of a runtime failure. fhirpath.js messages may quote data
 * (`Expected singleton ..., got [...]`), so the message is cut before the first quote,
 * bracket, brace, colon or comma.
 */
export function safeErrorMessage(err: unknown): string {
  if (err instanceof SafeEvalError) {
    return err.message;
  }
  const msg = err instanceof Error ? err.message : '';
  if (err instanceof RangeError && /call stack/i.test(msg)) {
    return 'expression recursed too deeply';
  }
  const cut = msg.search(/["'`[{:,\n]/);
  const head = (cut >= 0 ? msg.slice(0, cut) : msg).trim().slice(0, 120);
  return head === '' ? 'expression failed at run time' : head;
}
