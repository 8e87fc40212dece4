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

/**
 * Limits on one FHIRPath expression (a let, a `when`, one `{{ }}`) and on a pack's expressions
 * together. Far above real rules (the shipped pack's expressions: size 12,592 in all, the
 * largest 1,587, 5 brackets and 33 levels deep), they bound what compiling a pack costs in every
 * thread that evaluates it (the main thread for validation and the fast path, each worker):
 * fhirpath.js's parser is quadratic in bracket nesting, recursive in depth, and ~50 times
 * slower on a number literal than on any other token.
 * - `chars`: the size of one expression: its characters, a number literal counting as
 *   `numberWeight`;
 * - `nesting`: brackets (`( [ {`) open at once, checked before parsing;
 * - `depth`: levels of the parse tree (a chain of `.step`s, of `and`/`or`/`|` operands, nests
 *   one level per item);
 * - `packChars`: the size of all the expressions of a pack together.
 */
export const EXPRESSION_LIMITS = Object.freeze({
  chars: 8192,
  numberWeight: 64,
  nesting: 64,
  depth: 256,
  packChars: 65_536,
});

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

function isDigit(c: number): boolean {
  return c >= 48 && c <= 57;
}

function isWordChar(c: number): boolean {
  return isDigit(c) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c === 95;
}

/**
 * The size of an expression against `EXPRESSION_LIMITS` (its characters, a number literal
 * counting as `numberWeight`) and its deepest bracket nesting (`(`, `[`, `{`), outside string
 * literals, delimited identifiers, date literals and comments: a linear scan, run before the
 * parser (whose cost grows with the square of the nesting).
 */
export function expressionSize(expr: string): { size: number; nesting: number } {
  let depth = 0;
  let max = 0;
  let numbers = 0;
  for (let i = 0; i < expr.length; i++) {
    const c = expr.charCodeAt(i);
    if (isDigit(c)) {
      // A number literal (`12`, `1.5`), not the digits of an identifier (`item2`).
      const prev = i > 0 ? expr.charCodeAt(i - 1) : 32;
      if (!isWordChar(prev) && prev !== 46) {
        numbers++;
      }
      while (i + 1 < expr.length && isWordChar(expr.charCodeAt(i + 1))) {
        i++;
      }
    } else if (c === 64) {
      // @2020-01-01T10:00:00.000+01:00, @T10:00
      while (i + 1 < expr.length && /[0-9T:.+\-Z]/.test(expr.charAt(i + 1))) {
        i++;
      }
    } else if (isWordChar(c)) {
      while (i + 1 < expr.length && isWordChar(expr.charCodeAt(i + 1))) {
        i++;
      }
    } else if (c === 39 || c === 96) {
      // '...' or `...`, with backslash escapes.
      for (i++; i < expr.length && expr.charCodeAt(i) !== c; i++) {
        if (expr.charCodeAt(i) === 92) {
          i++;
        }
      }
    } else if (c === 47 && expr.charCodeAt(i + 1) === 47) {
      const end = expr.indexOf('\n', i);
      i = end < 0 ? expr.length : end;
    } else if (c === 47 && expr.charCodeAt(i + 1) === 42) {
      const end = expr.indexOf('*/', i + 2);
      i = end < 0 ? expr.length : end + 1;
    } else if (c === 40 || c === 91 || c === 123) {
      depth++;
      if (depth > max) {
        max = depth;
      }
    } else if ((c === 41 || c === 93 || c === 125) && depth > 0) {
      depth--;
    }
  }
  return { size: expr.length + numbers * (EXPRESSION_LIMITS.numberWeight - 1), nesting: max };
}

/** Whether a parse tree is more than `limit` levels deep (an explicit stack: no recursion). */
function deeperThan(root: AstNode, limit: number): boolean {
  const nodes: AstNode[] = [root];
  const depths: number[] = [1];
  while (nodes.length > 0) {
    const node = nodes.pop() as AstNode;
    const depth = depths.pop() as number;
    if (depth > limit) {
      return true;
    }
    for (const c of node.children ?? []) {
      nodes.push(c);
      depths.push(depth + 1);
    }
  }
  return false;
}

const TOO_DEEP = `expression nests too deeply (more than ${EXPRESSION_LIMITS.depth} levels); move parts of it into lets`;

/** The limits of one expression that are checked before parsing it. */
function limitIssue(expr: string): ExprIssue | undefined {
  if (expr.length > EXPRESSION_LIMITS.chars) {
    return {
      message: `expression is ${expr.length} characters long (limit ${EXPRESSION_LIMITS.chars}); move parts of it into lets`,
    };
  }
  const { size, nesting } = expressionSize(expr);
  if (size > EXPRESSION_LIMITS.chars) {
    return {
      message: `expression is too large: ${size} characters, counting each number literal as ${EXPRESSION_LIMITS.numberWeight} (limit ${EXPRESSION_LIMITS.chars}); move parts of it into lets`,
    };
  }
  if (nesting > EXPRESSION_LIMITS.nesting) {
    return {
      message: `expression nests more than ${EXPRESSION_LIMITS.nesting} brackets deep; move parts of it into lets`,
    };
  }
  return undefined;
}

/**
 * Statically checks one FHIRPath expression: its size (`EXPRESSION_LIMITS`), syntax (with the
 * parser's position), unknown functions, unknown `%variables`, unknown type names and
 * `inValueSet` arguments. Never throws.
 */
export function analyzeExpression(expr: string, scope: ExprScope): ExprAnalysis {
  const variables = new Set<string>();
  if (expr.trim() === '') {
    return { issues: [{ message: 'empty expression' }], variables };
  }
  const limit = limitIssue(expr);
  if (limit) {
    return { issues: [limit], variables };
  }
  let ast: AstNode;
  try {
    ast = fhirpath.parse(expr) as AstNode;
  } catch (err) {
    if (err instanceof RangeError) {
      return { issues: [{ message: TOO_DEEP }], variables };
    }
    return { issues: parseIssues(err), variables };
  }
  if (deeperThan(ast, EXPRESSION_LIMITS.depth)) {
    return { issues: [{ message: TOO_DEEP }], variables };
  }
  const st: WalkState = { issues: [], variables, defined: new Set(), scope };
  try {
    walk(ast, st);
  } catch (err) {
    if (!(err instanceof RangeError)) {
      throw err;
    }
    return { issues: [{ message: TOO_DEEP }], variables };
  }
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

/** fhirpath.js messages with no value in them, kept as they are. */
const FIXED_MESSAGES: ReadonlySet<string> = new Set([
  'Join requires a collection of strings.',
  "Decode 'hex' requires an even number of characters.",
  'matches/matchesFull flags must only contain i and/or m',
  'Unary - can only be applied to an individual number or Quantity.',
  'Unary + can only be applied to an individual number or Quantity.',
  'Infix invoke should have arity 2',
  'Cannot sort incomparable values',
  'Expected single',
  'Cannot substract a date/time based value from a quantity',
  'Cannot convert a FHIR.Quantity that has a comparator',
  'Expected a ResourceNode.',
  "%factory.create(type) doesn't support system types.",
  'The valueset does not have a single code system.',
  'No terminology server could satisfy the request.',
  'The terminology request could not be built.',
  '%questionnaire is needed but not specified.',
  'Option "terminologyUrl" is not specified.',
  'Option "fhirServerUrl" is not specified.',
  'The weight()/ordinal() function is not supported for the current model.',
  'Evaluation of the expression was aborted before it started.',
  // thrown as plain strings (not Errors) by fhirpath.js
  'Invalid comparison of a DateTime with something else',
  'Invalid comparison of a time with something else',
]);

/** What a collection was expected to be, in fhirpath.js's "Unexpected collection" messages. */
const EXPECTED_KINDS: ReadonlySet<string> = new Set([
  'singleton of type Boolean',
  'singleton of type Integer',
  'singleton of type String',
  'singleton of type Decimal',
  'singleton of type Extension',
  'singleton of type Coding',
  'singleton of type Resource',
  'number',
  'a number',
  'a number or a Quantity',
  'a Decimal, Date, DateTime, or Time',
  'value of type Coding',
]);

/** The type words of fhirpath.js's "Expected <type>, but got" messages. */
const EXPECTED_TYPES: ReadonlySet<string> = new Set([
  'boolean',
  'integer',
  'string',
  'decimal',
  'a number',
  'a number or a Quantity',
  'a Decimal, Date, DateTime, or Time',
]);

/** The operations of fhirpath.js's "<operation> is not implemented for <type>" messages. */
const UNIMPLEMENTED =
  /^(equals\(\)|equivalentTo\(\)|toNumber\(\)|Comparison|Addition|Subtraction|Negation|Multiplication|Division|abs\(\)|ceiling\(\)|floor\(\)|round\(\)|lowBoundary\(\)|highBoundary\(\)|truncate\(\)|divToInt\(\)|mod\(\)|exp\(\)|ln\(\)|log\(\)|power\(\)|sqrt\(\)) (?:is )?not implemented for /;

/**
 * A fixed, value-free text for a fhirpath.js message of a known shape (each `new Error(` of
 * fhirpath.js 5.2.2: spec/rules/engine-limits.spec.ts lists them), or undefined. Only the
 * message's code-written part decides the text; the values fhirpath.js puts in (data of the
 * call, quoted or not) never reach it.
 */
function knownMessage(msg: string): string | undefined {
  if (FIXED_MESSAGES.has(msg)) {
    return msg;
  }
  const head = msg.slice(0, 120);
  const unary = /^(Unary [+-] can only be applied to a number or Quantity\.) \(at \d+:\d+\)$/.exec(
    msg,
  );
  if (unary?.[1] !== undefined) {
    return unary[1];
  }
  const singleton =
    /^Expected singleton on (left|right) side of '?(contains|in|is|as)'?, got /.exec(head);
  if (singleton) {
    return `Expected singleton on ${singleton[1] ?? ''} side of ${singleton[2] ?? ''}`;
  }
  if (/^Unexpected (?:empty )?(?:collection|value)/.test(head)) {
    // The code-written tail follows the value: "...; expected singleton of type Boolean".
    const cut = msg.lastIndexOf('; expected ');
    const kind = cut >= 0 ? msg.slice(cut + '; expected '.length) : '';
    return EXPECTED_KINDS.has(kind)
      ? `Unexpected collection; expected ${kind}`
      : 'Unexpected collection; expected a single item';
  }
  const expected = /^Expected ([A-Za-z ,]{1,40}?), but got/.exec(head);
  if (expected?.[1] !== undefined) {
    return EXPECTED_TYPES.has(expected[1]) ? `Expected ${expected[1]}` : 'Unexpected value type';
  }
  if (head.startsWith('Cannot convert ')) {
    if (msg.endsWith(' to a number')) {
      return 'Cannot convert a value to a number';
    }
    if (/ to (?:a )?[Dd]ecimal$/.test(msg.slice(-12))) {
      return 'Cannot convert a value to a decimal';
    }
    return undefined;
  }
  if (head.startsWith('Cannot [')) {
    // math.js: "Cannot " + toJSON(xs) + " - " + toJSON(ys)
    return 'Cannot apply an arithmetic operator to these operands';
  }
  const invalid = /^Invalid (decimal value|date literal|date-time literal|time literal): /.exec(
    head,
  );
  if (invalid?.[1] !== undefined) {
    return `Invalid ${invalid[1]}`;
  }
  const unimplemented = UNIMPLEMENTED.exec(head);
  if (unimplemented?.[1] !== undefined) {
    return `${unimplemented[1]} is not implemented for this type`;
  }
  if (
    /^(Addition|Subtraction|Negation|Multiplication|Division|abs\(\)|ceiling\(\)) for /.test(head)
  ) {
    return `${head.slice(0, head.indexOf(' for '))} is not implemented for this type`;
  }
  const prefixes: Array<[string, string]> = [
    ['Cannot sort by non-primitive type: ', 'Cannot sort by non-primitive type'],
    ['Not implemented: ', 'Not implemented'],
    ['Not impl ', 'Not implemented'],
    [
      'Attempting to access an undefined environment variable: ',
      'Attempting to access an undefined environment variable',
    ],
    ['Expected TypeSpecifier node, got ', 'Expected TypeSpecifier node'],
    ['Expected identifier node, got ', 'Expected identifier node'],
    ['Expected "FHIR.Extension", got ', 'Expected an Extension'],
    ['Expected "FHIR.CodeableConcept", got ', 'Expected a CodeableConcept'],
    ['Do not know how to alias ', 'Do not know how to alias an operator'],
    ['Instance selector', 'Instance selector error'],
    [
      'For date/time arithmetic, the unit of the quantity must be one of the following time-based units: ',
      'For date/time arithmetic, the unit of the quantity must be a time-based unit',
    ],
    ['Unsupported unit for +. ', 'Unsupported unit for date/time arithmetic'],
    ['Environment Variable %', 'Variable already defined'],
    ['Variable %', 'Variable already defined'],
    ['Not supported type ', 'Not supported type'],
    ['The asynchronous function ', 'Asynchronous functions are not allowed'],
    ['The "signal" option ', 'The "signal" option is only supported for asynchronous functions'],
    [
      'The "httpHeaders" option ',
      'The "httpHeaders" option is only supported for asynchronous functions',
    ],
    ['Passing a signal to compile() ', 'Passing a signal to compile() is not allowed'],
  ];
  for (const [prefix, text] of prefixes) {
    if (head.startsWith(prefix)) {
      return text;
    }
  }
  if (msg.endsWith(' expects no params')) {
    return 'A function expects no params';
  }
  if (head.startsWith('No ') && msg.endsWith(' evaluator ')) {
    return 'No evaluator for an expression node';
  }
  if (/cannot be resolved to a valid type identifier(?: \(at \d+:\d+\))?$/.test(msg.slice(-70))) {
    return 'A type cannot be resolved to a valid type identifier';
  }
  return undefined;
}

/**
 * A PHI-free description of a runtime failure. fhirpath.js puts values into its messages,
 * quoted or not (`Cannot convert Okafor-Smith to a number`), so no part of a message is ever
 * passed on as such: a message of a known shape becomes a fixed text (its code-written part),
 * the engine's own `SafeEvalError`s keep theirs, and anything else is a fixed text naming only
 * the error's class.
 */
export function safeErrorMessage(err: unknown): string {
  if (err instanceof SafeEvalError) {
    return err.message;
  }
  if (typeof err === 'string') {
    // fhirpath.js throws some messages as plain strings (`util.raiseError`, date comparisons).
    if (FIXED_MESSAGES.has(err)) {
      return err;
    }
    const raised =
      /^(?:[A-Za-z]+: )?(Expected singleton input|The input collection contains multiple items)$/.exec(
        err,
      );
    return raised?.[1] ?? 'expression failed at run time';
  }
  if (!(err instanceof Error)) {
    return 'expression failed at run time';
  }
  const msg = err.message;
  if (err instanceof RangeError) {
    if (/call stack/i.test(msg)) {
      return 'expression recursed too deeply';
    }
    if (msg === 'Invalid string length') {
      return 'a string grew too long';
    }
    if (msg === 'Invalid array length') {
      return 'a collection grew too long';
    }
  }
  const sortPrefix = 'Sort expression evaluation error: ';
  if (msg.startsWith(sortPrefix)) {
    const inner = knownMessage(msg.slice(sortPrefix.length));
    return inner === undefined ? 'Sort expression evaluation error' : `${sortPrefix}${inner}`;
  }
  const known = knownMessage(msg);
  if (known !== undefined) {
    return known.slice(0, 120);
  }
  return err instanceof TypeError
    ? 'expression failed at run time (TypeError)'
    : 'expression failed at run time';
}
