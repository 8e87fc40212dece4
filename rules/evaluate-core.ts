/**
 * The synchronous evaluation of a pack's rules for one call: the expression environment,
 * `let` values (computed at most once per run, on first use), `when`, card interpolation.
 * Runs inside an evaluation worker (see evaluator.ts) or inline. This is the one place rule
 * semantics live; a faster path (issue 6) plugs in here.
 */
import type { UserInvocationTable } from 'fhirpath';
import type {
  CompiledCard,
  CompiledRule,
  CompiledText,
  CompiledValue,
  PackProgram,
} from './compile-pack.ts';
import {
  buildFunctionTable,
  collectionText,
  compileExpression,
  instantValues,
  parseTemplate,
  safeErrorMessage,
  SafeEvalError,
} from './expression.ts';
import { fastInstantValues, HandOff } from './fast-path.ts';
import { splitTopLevelAnd, summarizeValue } from './trace-values.ts';
import type { EvaluationInput, LetTraceEntry, RawCard, TraceEntry } from './types.ts';

/** A guarded run's hand-off passes through every per-rule catch (see fast-path runGuarded). */
function passHandOff(err: unknown): void {
  if (err instanceof HandOff) {
    throw err;
  }
}

/**
 * Card summaries must stay under this many characters (CDS Hooks 2.0: "<140-character"),
 * counted in UTF-16 code units as `finalizeCards` counts them (never fewer than the characters).
 */
export const SUMMARY_LIMIT = 140;

const ELLIPSIS = '…';

/** The first `n` code units of `text` at most, never ending inside a surrogate pair. */
function cutAt(text: string, n: number): string {
  let end = Math.max(0, Math.min(n, text.length));
  const last = text.charCodeAt(end - 1);
  if (end > 0 && end < text.length && last >= 0xd800 && last <= 0xdbff) {
    end--; // a high surrogate whose low half would be cut off
  }
  return text.slice(0, end).trimEnd();
}

/**
 * A summary that interpolation made `SUMMARY_LIMIT` characters or longer, shortened to fit with
 * `…`: the template's leading and trailing literal text are kept whole and what lies between
 * (the interpolated values) is cut at its end (`Warfarin + <long drug name>…: increased risk of
 * bleeding`); when that leaves no room (a template that starts and ends with literal text that
 * alone nearly fills the limit) or the template is not one, the whole text is cut at its end.
 * The alert matters more than the end of a long drug name (issue: a 150-character display text
 * used to drop the card). Shorter summaries are returned as they are. Without a template (the
 * backstop in `finalizeCards`, which no longer knows it) the whole text is cut at its end.
 */
export function shortenSummary(text: string, template = ''): string {
  const max = SUMMARY_LIMIT - 1;
  if (text.length <= max) {
    return text;
  }
  const parsed = parseTemplate(template);
  const parts = parsed.ok ? parsed.parts : [];
  const first = parts.length > 1 ? parts[0] : undefined;
  const last = parts.length > 1 ? parts[parts.length - 1] : undefined;
  const head = first?.kind === 'text' ? first.text : '';
  const tail = last?.kind === 'text' ? last.text : '';
  const room = max - head.length - tail.length - ELLIPSIS.length;
  if (
    room >= 0 &&
    (head !== '' || tail !== '') &&
    text.startsWith(head) &&
    text.endsWith(tail) &&
    head.length + tail.length <= text.length
  ) {
    const middle = text.slice(head.length, text.length - tail.length);
    return `${head}${cutAt(middle, room)}${ELLIPSIS}${tail}`;
  }
  return `${cutAt(text, max - ELLIPSIS.length)}${ELLIPSIS}`;
}

/**
 * Refuses a required card field that interpolation left empty: `finalizeCards` strips `""` as
 * absent and would then reject the whole call's cards (CDS Hooks 2.0 requires summary, link
 * and suggestion labels, action descriptions). The message names the field, never its value
 * (values come from patient data).
 */
function required(text: string, name: string, why = 'required'): string {
  if (text === '') {
    throw new SafeEvalError(`card.${name}: empty after interpolation (${why})`);
  }
  return text;
}

/**
 * Card urls must be absolute http(s) URLs (CDS Hooks 2.0). One test for the engine and
 * `finalizeCards` (hooks/), so the two never disagree (a scheme is case-insensitive, `new URL`
 * trims spaces).
 */
export function isAbsoluteHttpUrl(text: string): boolean {
  try {
    const url = new URL(text);
    return url.protocol === 'https:' || url.protocol === 'http:';
  } catch {
    return false;
  }
}

/** A FHIR id (R4 `id`): the id part of a reference. */
const REF_ID = '[A-Za-z0-9\\-.]{1,64}';
/** `Type/id` or `Type/id/_history/vid`, alone or after a FHIR server's base URL (R4 references.html). */
const RESTFUL_REFERENCE = new RegExp(
  `^(?:https?://(?:[A-Za-z0-9\\-.:%$]*/)+)?[A-Z][A-Za-z]+/${REF_ID}(?:/_history/${REF_ID})?$`,
);
/** A contained resource (`#id`), a uuid or an oid (FHIR R4 `uuid`, `oid`). */
const LOCAL_REFERENCE = new RegExp(
  `^(?:#${REF_ID}|urn:uuid:[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|urn:oid:[0-2](?:\\.(?:0|[1-9][0-9]*))+)$`,
);

/** Why `buildCard` drops a suggestion whose resource carries a bad reference (PHI-free). */
const BAD_REFERENCE =
  'not a valid reference after interpolation (Type/id, an absolute URL to one, #id, urn:uuid or urn:oid)';

/**
 * Whether a FHIR `Reference.reference` is well formed: relative `Type/id` (optionally
 * `/_history/vid`), an absolute http(s) URL ending so, `#id`, `urn:uuid:` or `urn:oid:`.
 * `Patient/`, `Patient/ ` or a bare `#` (an interpolation that gave nothing) are not.
 */
export function isFhirReference(text: string): boolean {
  return RESTFUL_REFERENCE.test(text) || LOCAL_REFERENCE.test(text);
}

/**
 * The path (e.g. `.basedOn[1].reference`) of the first string under a `reference` key, at any
 * depth of a suggestion's resource, that is not `isFhirReference`; undefined if there is none.
 * One walk for the engine (`buildCard` drops the suggestion) and `finalizeCards` (backstop).
 * A key that is no FHIR element name may come from patient data: it is shown as `[?]`. A bare
 * `#` inside `contained` (a contained resource pointing back to its container) is allowed.
 */
export function findBadReference(value: unknown, inContained = false): string | undefined {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const bad = findBadReference(value[i], inContained);
      if (bad !== undefined) {
        return `[${i}]${bad}`;
      }
    }
    return undefined;
  }
  if (!isObj(value)) {
    return undefined;
  }
  for (const key of Object.keys(value)) {
    const v = value[key];
    const here = /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? `.${key}` : '[?]';
    if (key === 'reference' && typeof v === 'string') {
      // A bare `#` is a contained resource's reference to its container (R4 dom-3).
      if (!isFhirReference(v) && !(inContained && v === '#')) {
        return here;
      }
      continue;
    }
    const bad = findBadReference(v, inContained || key === 'contained');
    if (bad !== undefined) {
      return `${here}${bad}`;
    }
  }
  return undefined;
}

/** Callbacks of a run, in the order things happen. */
export interface RunHooks {
  /** Rule `index` of `ruleIds` is about to run (its lets first, then `when` and its card). */
  onRuleStart?(index: number): void;
  /** A let is about to be computed (lets the caller attribute a timeout to it). */
  onLetStart?(name: string): void;
  onLet?(entry: LetTraceEntry): void;
  onRule(entry: TraceEntry, card: RawCard | undefined): void;
  /** Checked before each rule; true = stop (the caller marks the rest skipped). */
  shouldStop?(): boolean;
  /**
   * Author tools only (never the live hook path): each ok let's entry gets a `value` summary
   * and a not-fired rule its `firstFalse` operand (computed outside the measured durations).
   * Runs fhirpath.js: never set it inside `runGuarded`.
   */
  traceValues?: boolean;
}

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The Patient of a call: a prefetch value that is a Patient, or one inside a prefetch Bundle. */
export function findPatient(prefetch: Record<string, unknown>, patientId: unknown): unknown {
  const values = Object.values(prefetch);
  const direct = values.find((v) => isObj(v) && v.resourceType === 'Patient');
  if (direct !== undefined) {
    return direct;
  }
  for (const v of values) {
    if (isObj(v) && v.resourceType === 'Bundle' && Array.isArray(v.entry)) {
      for (const e of v.entry as unknown[]) {
        const r = isObj(e) ? e.resource : undefined;
        if (
          isObj(r) &&
          r.resourceType === 'Patient' &&
          (patientId === undefined || r.id === patientId)
        ) {
          return r;
        }
      }
    }
  }
  return undefined;
}

/** `%selections`: the draft order resources whose `Type/id` is listed in `context.selections`. */
export function findSelections(context: Record<string, unknown>): unknown[] {
  const drafts = context.draftOrders;
  const selections = context.selections;
  if (!isObj(drafts) || !Array.isArray(drafts.entry) || !Array.isArray(selections)) {
    return [];
  }
  const wanted = new Set(selections.filter((s): s is string => typeof s === 'string'));
  const out: unknown[] = [];
  for (const e of drafts.entry as unknown[]) {
    const r = isObj(e) ? e.resource : undefined;
    if (
      isObj(r) &&
      typeof r.resourceType === 'string' &&
      typeof r.id === 'string' &&
      wanted.has(`${r.resourceType}/${r.id}`)
    ) {
      out.push(r);
    }
  }
  return out;
}

/** Builds the variables every expression of the call sees (lets are added as computed). */
export function buildVariables(
  program: PackProgram,
  input: EvaluationInput,
): Record<string, unknown> {
  const vars = Object.create(null) as Record<string, unknown>;
  const instant = fastInstantValues(input.now) ?? instantValues(input.now);
  vars.context = input.context;
  vars.prefetch = input.prefetch;
  vars.patient = findPatient(input.prefetch, input.context.patientId);
  vars.draftOrders = input.context.draftOrders;
  vars.selections = findSelections(input.context);
  vars.now = instant.now;
  vars.today = instant.today;
  vars.__timeOfDay = instant.timeOfDay;
  for (const [name, vs] of program.valueSets) {
    vars[name] = vs.list;
  }
  return vars;
}

function renderText(t: CompiledText, root: unknown, vars: Record<string, unknown>): string {
  let out = '';
  for (const part of t.parts) {
    out += typeof part === 'string' ? part : collectionText(part(root, vars));
  }
  return out;
}

function plain(value: unknown): unknown {
  return typeof value === 'object' && value !== null
    ? (JSON.parse(JSON.stringify(value)) as unknown)
    : value;
}

const OMIT = Symbol('omit');

function renderValue(v: CompiledValue, root: unknown, vars: Record<string, unknown>): unknown {
  switch (v.kind) {
    case 'static':
      return plain(v.value);
    case 'text': {
      if (v.text.whole) {
        // A string that is exactly one interpolation keeps the typed value(s).
        const items = v.text.whole(root, vars).map(plain);
        return items.length === 0 ? OMIT : items.length === 1 ? items[0] : items;
      }
      return renderText(v.text, root, vars);
    }
    case 'array': {
      // An array or object emptied by empty interpolations is left out too (FHIR has no empties).
      const out: unknown[] = [];
      for (const item of v.items) {
        const r = renderValue(item, root, vars);
        if (r !== OMIT) {
          out.push(r);
        }
      }
      return out.length === 0 && v.items.length > 0 ? OMIT : out;
    }
    case 'object': {
      const out: Record<string, unknown> = {};
      let kept = 0;
      for (const [key, item] of v.entries) {
        const r = renderValue(item, root, vars);
        if (r !== OMIT) {
          kept++;
          Object.defineProperty(out, key, {
            value: r,
            enumerable: true,
            writable: true,
            configurable: true,
          });
        }
      }
      return kept === 0 && v.entries.length > 0 ? OMIT : out;
    }
  }
}

/**
 * Interpolates a rule's card. A required field left empty (summary, link label, suggestion
 * label, action description, a delete's resourceId) or a link url that is not an absolute
 * http(s) URL fails the rule here, so the call's other cards survive; `finalizeCards`'s checks
 * are only the backstop for bugs. Optional fields (detail, appContext) may come out empty:
 * stripping drops them. A summary of 140+ characters is shortened (`shortenSummary`), never
 * fatal: the card goes, and `notes` (when given) gets a PHI-free line saying so.
 * With `dropped`, a suggestion that fails so is left out instead (its reason appended there,
 * PHI-free): the card, the alert, still goes; without any suggestion left it has no
 * `selectionBehavior` either.
 * @throws SafeEvalError (PHI-free) naming the failing field, never its value.
 */
export function buildCard(
  ruleId: string,
  card: CompiledCard,
  root: unknown,
  vars: Record<string, unknown>,
  dropped?: string[],
  notes?: string[],
): RawCard {
  const field = <T>(name: string, f: () => T): T => {
    try {
      return f();
    } catch (err) {
      passHandOff(err);
      throw new SafeEvalError(`card.${name}: ${safeErrorMessage(err)}`);
    }
  };
  const t = card.template;
  let summary = required(
    field('summary', () => renderText(card.summary, root, vars)),
    'summary',
  );
  if (summary.length >= SUMMARY_LIMIT) {
    const before = summary.length;
    summary = shortenSummary(summary, t.summary);
    notes?.push(
      `card.summary: ${before} characters after interpolation, shortened to ${summary.length} (must be under ${SUMMARY_LIMIT})`,
    );
  }
  const out: RawCard = {
    ruleId,
    summary,
    indicator: t.indicator,
    source: structuredClone(t.source),
  };
  if (card.detail) {
    const d = card.detail;
    out.detail = field('detail', () => renderText(d, root, vars));
  }
  if (card.links && t.links) {
    const links = t.links;
    out.links = card.links.map((l, i) => {
      const type = links[i]?.type ?? 'absolute';
      const label = field(`links[${i}].label`, () => renderText(l.label, root, vars));
      const url = field(`links[${i}].url`, () => renderText(l.url, root, vars));
      required(label, `links[${i}].label`);
      if (!isAbsoluteHttpUrl(url)) {
        throw new SafeEvalError(
          `card.links[${i}].url: not an absolute http(s) URL after interpolation`,
        );
      }
      const link: NonNullable<RawCard['links']>[number] = { label, url, type };
      if (l.appContext) {
        const a = l.appContext;
        link.appContext = field(`links[${i}].appContext`, () => renderText(a, root, vars));
      }
      return link;
    });
  }
  if (t.overrideReasons) {
    out.overrideReasons = structuredClone(t.overrideReasons);
  }
  if (t.selectionBehavior) {
    out.selectionBehavior = t.selectionBehavior;
  }
  if (card.suggestions && t.suggestions) {
    // A suggestion that interpolation broke (an action's target id not a FHIR id, an empty
    // label...) is dropped with its reason in `dropped`; the card itself, the alert, still goes.
    const built = card.suggestions.map((s, i) => {
      try {
        return buildSuggestion(s, i);
      } catch (err) {
        passHandOff(err);
        if (!(err instanceof SafeEvalError) || dropped === undefined) {
          throw err;
        }
        dropped.push(err.message);
        return undefined;
      }
    });
    const kept = built.filter((x) => x !== undefined);
    if (kept.length > 0) {
      out.suggestions = kept;
    } else {
      delete out.selectionBehavior;
    }
  }
  return out;

  function buildSuggestion(
    s: NonNullable<CompiledCard['suggestions']>[number],
    i: number,
  ): NonNullable<RawCard['suggestions']>[number] {
    const sugs = t.suggestions ?? [];
    const sug: NonNullable<RawCard['suggestions']>[number] = {
      label: required(
        field(`suggestions[${i}].label`, () => renderText(s.label, root, vars)),
        `suggestions[${i}].label`,
      ),
    };
    const rec = sugs[i]?.isRecommended;
    if (rec !== undefined) {
      sug.isRecommended = rec;
    }
    if (s.actions) {
      sug.actions = s.actions.map((a, j) => {
        const p = `suggestions[${i}].actions[${j}]`;
        const act: NonNullable<NonNullable<RawCard['suggestions']>[number]['actions']>[number] = {
          type: a.type,
          description: required(
            field(`${p}.description`, () => renderText(a.description, root, vars)),
            `${p}.description`,
          ),
        };
        if (a.resource) {
          const res = a.resource;
          const r = field(`${p}.resource`, () => renderValue(res, root, vars));
          if (typeof r === 'object' && r !== null && !Array.isArray(r)) {
            act.resource = r as Record<string, unknown>;
            // An update replaces the resource with this id (required at pack load): one that
            // interpolation left empty would be stripped and the update would name no target.
            if (a.type === 'update') {
              const rid = act.resource.id;
              required(
                typeof rid === 'string' ? rid : '',
                `${p}.resource.id`,
                'required for update',
              );
            }
            // A reference the resource carries must name something: `Patient/{{ %x.id }}` with
            // no id gave `Patient/`, which went to the EHR (static ones are checked here too).
            const bad = findBadReference(act.resource);
            if (bad !== undefined) {
              throw new SafeEvalError(`card.${p}.resource${bad}: ${BAD_REFERENCE}`);
            }
          }
        }
        if (a.resourceId) {
          const rid = a.resourceId;
          act.resourceId = field(`${p}.resourceId`, () => renderText(rid, root, vars));
          // A delete names its target by resourceId (CDS Hooks 2.0, cds-resp-2; required at
          // pack load): stripping an empty one would send a delete of nothing in particular.
          if (a.type === 'delete') {
            required(act.resourceId, `${p}.resourceId`, 'required for delete');
          }
        }
        return act;
      });
    }
    return sug;
  }
}

function describeWhen(result: unknown[]): string {
  if (result.length !== 1) {
    return `when must give one boolean, got ${result.length} items`;
  }
  const v = result[0];
  const kind =
    v === null
      ? 'null'
      : Array.isArray(v)
        ? 'array'
        : typeof v === 'object'
          ? 'an element'
          : typeof v;
  return `when must give a boolean, got ${kind}`;
}

/** Counters for tests and metrics (per thread). */
export const engineCounters = { letEvaluations: 0, ruleEvaluations: 0 };

/** One call's evaluation: its variables, computed lets and let errors. */
class RuleRun {
  readonly vars: Record<string, unknown>;
  readonly root: unknown;
  private readonly letErrors: Map<string, string>;
  private readonly computed = new Set<string>();
  /** The value-set functions, for `firstFalse` (author tools only). */
  private table: UserInvocationTable | undefined;

  constructor(
    private readonly program: PackProgram,
    input: EvaluationInput,
    private readonly hooks: RunHooks,
    failedLets: Readonly<Record<string, string>>,
  ) {
    this.vars = buildVariables(program, input);
    this.root = input.context;
    this.letErrors = new Map<string, string>(Object.entries(failedLets));
  }

  /** Computes a let (and its dependencies) once; returns its error, if it failed. */
  ensureLet(name: string, seen?: Set<string>): string | undefined {
    if (this.computed.has(name)) {
      return undefined;
    }
    const known = this.letErrors.get(name);
    if (known !== undefined) {
      return known;
    }
    const compiled = this.program.lets.get(name);
    const path = seen ?? new Set<string>();
    if (!compiled || path.has(name)) {
      return 'is not computable';
    }
    path.add(name);
    const hooks = this.hooks;
    for (const dep of compiled.deps) {
      const depError = this.ensureLet(dep, path);
      if (depError !== undefined) {
        const msg = `depends on let '${dep}', which failed`;
        this.letErrors.set(name, msg);
        hooks.onLet?.({ name, status: 'error', durationMs: 0, error: msg });
        return msg;
      }
    }
    hooks.onLetStart?.(name);
    const t0 = performance.now();
    engineCounters.letEvaluations++;
    try {
      this.vars[name] = compiled.fn(this.root, this.vars);
      this.computed.add(name);
      const entry: LetTraceEntry = { name, status: 'ok', durationMs: performance.now() - t0 };
      if (hooks.traceValues === true) {
        entry.value = summarizeValue(this.vars[name]);
      }
      hooks.onLet?.(entry);
      return undefined;
    } catch (err) {
      passHandOff(err);
      const msg = safeErrorMessage(err);
      this.letErrors.set(name, msg);
      hooks.onLet?.({ name, status: 'error', durationMs: performance.now() - t0, error: msg });
      return msg;
    }
  }

  private done(
    rule: CompiledRule,
    t0: number,
    status: TraceEntry['status'],
    fired: boolean,
    card?: RawCard,
    error?: string,
  ): void {
    const entry: TraceEntry = {
      ruleId: rule.id,
      status,
      fired,
      durationMs: performance.now() - t0,
    };
    if (error !== undefined) {
      entry.error = error;
    }
    this.hooks.onRule(entry, card);
  }

  /**
   * Author tools only: the first top-level `and`-operand of the rule's `when` that comes out
   * empty or false, evaluated alone with fhirpath.js (the reference); undefined when the
   * `when` has no such form or an operand fails.
   */
  private firstFalse(rule: CompiledRule): TraceEntry['firstFalse'] {
    const source = this.program.pack.rules.find((r) => r.id === rule.id)?.when;
    const operands = source === undefined ? undefined : splitTopLevelAnd(source);
    if (!operands) {
      return undefined;
    }
    this.table ??= buildFunctionTable(this.program.valueSets);
    const table = this.table;
    for (let i = 0; i < operands.length; i++) {
      const expression = operands[i] as string;
      let out: unknown[];
      try {
        out = compileExpression(expression, table)(this.root, this.vars);
      } catch (err) {
        passHandOff(err);
        return undefined;
      }
      if (out.length === 0 || (out.length === 1 && out[0] === false)) {
        return {
          operand: i + 1,
          of: operands.length,
          expression,
          result: out.length === 0 ? 'empty' : 'false',
        };
      }
    }
    return undefined;
  }

  runRule(rule: CompiledRule): void {
    for (const name of rule.lets) {
      const err = this.ensureLet(name);
      if (err !== undefined) {
        this.hooks.onRule(
          {
            ruleId: rule.id,
            status: 'error',
            fired: false,
            durationMs: 0,
            error: `let '${name}' failed: ${err}`,
          },
          undefined,
        );
        return;
      }
    }
    engineCounters.ruleEvaluations++;
    const t0 = performance.now();
    let result: unknown[];
    try {
      result = rule.when(this.root, this.vars);
    } catch (err) {
      passHandOff(err);
      this.done(rule, t0, 'error', false, undefined, `when: ${safeErrorMessage(err)}`);
      return;
    }
    if (result.length === 0 || (result.length === 1 && result[0] === false)) {
      if (this.hooks.traceValues === true) {
        const entry: TraceEntry = {
          ruleId: rule.id,
          status: 'not-fired',
          fired: false,
          durationMs: performance.now() - t0,
        };
        const firstFalse = this.firstFalse(rule);
        if (firstFalse) {
          entry.firstFalse = firstFalse;
        }
        this.hooks.onRule(entry, undefined);
        return;
      }
      this.done(rule, t0, 'not-fired', false);
      return;
    }
    if (!(result.length === 1 && result[0] === true)) {
      this.done(rule, t0, 'error', false, undefined, describeWhen(result));
      return;
    }
    let card: RawCard;
    const dropped: string[] = [];
    const notes: string[] = [];
    try {
      card = buildCard(rule.id, rule.card, this.root, this.vars, dropped, notes);
    } catch (err) {
      passHandOff(err);
      this.done(rule, t0, 'error', true, undefined, safeErrorMessage(err));
      return;
    }
    // Fired, its card sent; a shortened summary or a suggestion it had to drop is named (a rule
    // error for the logs: the card the EHR got is not the one the pack describes).
    if (dropped.length > 0) {
      notes.push(`suggestion dropped: ${dropped.join('; ')}`);
    }
    this.done(rule, t0, 'fired', true, card, notes.length > 0 ? notes.join('; ') : undefined);
  }
}

/**
 * Evaluates `ruleIds` (in order) of a program for one call. Never throws for a rule: each
 * outcome goes to `hooks.onRule`. `failedLets` carries lets that failed in an earlier attempt
 * of the same call (e.g. timed out in a worker that was replaced): they are not recomputed.
 */
export function runRules(
  program: PackProgram,
  input: EvaluationInput,
  ruleIds: readonly string[],
  hooks: RunHooks,
  failedLets: Readonly<Record<string, string>> = {},
): void {
  const run = new RuleRun(program, input, hooks, failedLets);
  for (let index = 0; index < ruleIds.length; index++) {
    if (hooks.shouldStop?.() === true) {
      return;
    }
    hooks.onRuleStart?.(index);
    const id = ruleIds[index] as string;
    const rule = program.rulesById.get(id);
    if (!rule) {
      hooks.onRule(
        { ruleId: id, status: 'error', fired: false, durationMs: 0, error: 'unknown rule' },
        undefined,
      );
      continue;
    }
    run.runRule(rule);
  }
}
