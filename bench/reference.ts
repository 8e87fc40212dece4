/**
 * The engine section's two yardsticks, written here independently of the rules engine:
 *
 * - `RuleByRuleFhirpath`: compiled fhirpath.js applied rule by rule without sharing: for each
 *   rule, a fresh environment, every `let` the rule reads (transitively, in dependency order)
 *   evaluated again, then `when`, then the `{{ }}` of its card if it fired. This is what a
 *   service that simply hands each rule to fhirpath.js would do.
 * - `handWritten`: plain JavaScript for three rules of the shipped pack (the floor).
 */
import fhirpath from 'fhirpath';
import type { Model, UserInvocationTable } from 'fhirpath';
import r4 from 'fhirpath/fhir-context/r4';
import { findPatient } from '../rules/evaluate-core.ts';
import type { EvaluationInput, RulePack } from '../rules/index.ts';

type Json = Record<string, unknown>;
type Compiled = (root: unknown, vars: Json) => unknown[];

const MODEL: Model = r4;

function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

interface VsIndex {
  pairs: Set<string>;
  codes: Set<string>;
}

function indexValueSets(pack: RulePack): Map<string, VsIndex> {
  const sets = new Map<string, VsIndex>();
  for (const [name, vs] of Object.entries(pack.valueSets ?? {})) {
    sets.set(name, {
      pairs: new Set(vs.codes.map((c) => `${c.system}|${c.code}`)),
      codes: new Set(vs.codes.map((c) => c.code)),
    });
  }
  return sets;
}

function codingIn(c: Json, vs: VsIndex): boolean {
  return (
    typeof c.code === 'string' &&
    (typeof c.system === 'string' ? vs.pairs.has(`${c.system}|${c.code}`) : vs.codes.has(c.code))
  );
}

/** `inValueSet`: a code string by code, a Coding by system+code, a CodeableConcept by any coding. */
function inValueSetTable(sets: Map<string, VsIndex>): UserInvocationTable {
  return {
    inValueSet: {
      fn: (items: unknown[], name: unknown): unknown[] => {
        const vs = typeof name === 'string' ? sets.get(name) : undefined;
        if (!vs) {
          throw new Error('unknown value set');
        }
        if (items.length === 0) {
          return [];
        }
        return [
          items.some((item) => {
            if (typeof item === 'string') {
              return vs.codes.has(item);
            }
            if (!isObj(item)) {
              return false;
            }
            return Array.isArray(item.coding)
              ? item.coding.some((c) => isObj(c) && codingIn(c, vs))
              : codingIn(item, vs);
          }),
        ];
      },
      arity: { 1: ['String'] },
    },
  };
}

function findSelections(context: Json): unknown[] {
  const drafts = context.draftOrders;
  const wanted = Array.isArray(context.selections) ? (context.selections as unknown[]) : [];
  if (!isObj(drafts) || !Array.isArray(drafts.entry)) {
    return [];
  }
  return (drafts.entry as unknown[])
    .map((e) => (isObj(e) ? e.resource : undefined))
    .filter(
      (r): r is Json => isObj(r) && wanted.includes(`${String(r.resourceType)}/${String(r.id)}`),
    );
}

/** Every `{{ expr }}` in a card (any string field, at any depth). */
function cardExpressions(card: unknown, out: string[] = []): string[] {
  if (typeof card === 'string') {
    for (const m of card.matchAll(/\{\{([\s\S]*?)\}\}/g)) {
      out.push((m[1] ?? '').trim());
    }
  } else if (Array.isArray(card)) {
    for (const v of card) {
      cardExpressions(v, out);
    }
  } else if (isObj(card)) {
    for (const v of Object.values(card)) {
      cardExpressions(v, out);
    }
  }
  return out;
}

interface RefRule {
  id: string;
  service: string;
  /** The lets this rule reads (when and card), transitively, in dependency order. */
  lets: Array<{ name: string; fn: Compiled }>;
  when: Compiled;
  card: Compiled[];
}

/** Compiled fhirpath.js, rule by rule, nothing shared between rules. */
export class RuleByRuleFhirpath {
  private readonly rules: RefRule[];
  private readonly valueSetVars: Json;

  constructor(pack: RulePack) {
    const sets = indexValueSets(pack);
    const table = inValueSetTable(sets);
    const compile = (expr: string, raw: boolean): Compiled => {
      const fn = fhirpath.compile(expr, MODEL, {
        userInvocationTable: table,
        resolveInternalTypes: !raw,
      });
      return (root, vars) => fn(root, vars) as unknown[];
    };
    const lets = pack.let ?? {};
    const letNames = Object.keys(lets);
    const refsOf = (expr: string) =>
      [...expr.matchAll(/%([A-Za-z_][A-Za-z0-9_]*)/g)]
        .map((m) => m[1] ?? '')
        .filter((n) => letNames.includes(n));
    const compiledLets = new Map(letNames.map((n) => [n, compile(lets[n] ?? '', true)]));
    const order = (names: string[]): string[] => {
      const out: string[] = [];
      const visit = (n: string) => {
        if (out.includes(n)) {
          return;
        }
        for (const d of refsOf(lets[n] ?? '')) {
          visit(d);
        }
        out.push(n);
      };
      names.forEach(visit);
      return out;
    };
    this.valueSetVars = Object.fromEntries(
      Object.entries(pack.valueSets ?? {}).map(([k, vs]) => [k, vs.codes.map((c) => c.code)]),
    );
    this.rules = pack.rules.map((rule) => {
      const cardExprs = cardExpressions(rule.card);
      const names = order([rule.when, ...cardExprs].flatMap(refsOf));
      return {
        id: rule.id,
        service: rule.service,
        lets: names.map((name) => ({ name, fn: compiledLets.get(name) as Compiled })),
        when: compile(rule.when, false),
        card: cardExprs.map((e) => compile(e, false)),
      };
    });
  }

  private baseVars(input: EvaluationInput): Json {
    const iso = input.now.toISOString();
    const at = (literal: string): unknown =>
      (fhirpath.evaluate({}, literal, {}, MODEL, { resolveInternalTypes: false }) as unknown[])[0];
    const context = input.context;
    return {
      ...this.valueSetVars,
      context,
      prefetch: input.prefetch,
      patient: findPatient(input.prefetch, context.patientId),
      draftOrders: context.draftOrders,
      selections: findSelections(context),
      now: at(`@${iso}`),
      today: at(`@${iso.slice(0, 10)}`),
    };
  }

  /** The ids of the rules of `ruleIds` that fire (each rule evaluated on its own). */
  fired(input: EvaluationInput, ruleIds: readonly string[]): string[] {
    const fired: string[] = [];
    const base = this.baseVars(input);
    for (const rule of this.rules) {
      if (!ruleIds.includes(rule.id)) {
        continue;
      }
      const vars: Json = { ...base };
      try {
        for (const l of rule.lets) {
          vars[l.name] = l.fn(input.context, vars);
        }
        const r = rule.when(input.context, vars);
        if (r.length === 1 && r[0] === true) {
          for (const c of rule.card) {
            c(input.context, vars);
          }
          fired.push(rule.id);
        }
      } catch {
        // An erroring rule does not fire (the engine reports it as an error).
      }
    }
    return fired;
  }
}

// ------------------------------------------------------------------------------------------
// Hand-written JavaScript for three rules (the floor).

const DAY_MS = 86_400_000;

function entries(bundle: unknown): Json[] {
  if (!isObj(bundle) || !Array.isArray(bundle.entry)) {
    return [];
  }
  const out: Json[] = [];
  for (const e of bundle.entry as unknown[]) {
    if (isObj(e) && isObj(e.resource)) {
      out.push(e.resource);
    }
  }
  return out;
}

function conceptIn(concept: unknown, vs: VsIndex): boolean {
  return (
    isObj(concept) &&
    Array.isArray(concept.coding) &&
    concept.coding.some((c) => isObj(c) && codingIn(c, vs))
  );
}

function conceptName(concept: unknown): string {
  if (!isObj(concept)) {
    return '';
  }
  if (typeof concept.text === 'string') {
    return concept.text;
  }
  const first = Array.isArray(concept.coding) ? (concept.coding[0] as unknown) : undefined;
  return isObj(first) && typeof first.display === 'string' ? first.display : '';
}

/** The three hand-written rules and what they return for one call: rule id -> summary. */
export interface HandWritten {
  ruleIds: readonly string[];
  run(input: EvaluationInput): Map<string, string>;
}

/**
 * warfarin-nsaid and nsaid-severe-ckd (order-sign), metformin-low-egfr-review (patient-view),
 * as a developer would write them by hand for the shipped pack's data: same decisions and
 * summaries, no FHIRPath.
 */
export function handWrittenRules(pack: RulePack): HandWritten {
  const sets = indexValueSets(pack);
  const vs = (name: string): VsIndex => {
    const v = sets.get(name);
    if (!v) {
      throw new Error(`bench: the pack has no value set ${name}`);
    }
    return v;
  };
  const nsaids = vs('nsaids');
  const warfarin = vs('warfarin');
  const metformin = vs('metformin');
  const egfr = vs('egfr');
  const perMinute = vs('egfrUnitsPerMinute');
  const perSecond = vs('egfrUnitsPerSecond');
  const RESULT = new Set(['final', 'amended', 'corrected', 'preliminary']);
  // The instant a result is dated by (effective dateTime, Period start or instant, else issued).
  const datedBy = (o: Json): string | undefined => {
    const period = isObj(o.effectivePeriod) ? o.effectivePeriod.start : undefined;
    for (const v of [o.effectiveDateTime, period, o.effectiveInstant, o.issued]) {
      if (typeof v === 'string') {
        return v;
      }
    }
    return undefined;
  };
  // The latest eGFR result whatever its value; at that instant, the lowest Quantity in mL/min
  // (mL/s x 60; a "<" comparator just under its value). Synthea reports no eGFR as text, so
  // text results are not read here.
  const latestEgfr = (prefetch: Json) => {
    let at = Number.NEGATIVE_INFINITY;
    let atResults: Array<{ o: Json; when: string }> = [];
    for (const o of [...entries(prefetch.labs), ...entries(prefetch.item6)]) {
      if (
        o.resourceType !== 'Observation' ||
        !RESULT.has(String(o.status)) ||
        !conceptIn(o.code, egfr)
      ) {
        continue;
      }
      const when = datedBy(o);
      const t = when === undefined ? Number.NaN : Date.parse(when);
      if (when === undefined || Number.isNaN(t)) {
        continue;
      }
      if (t > at) {
        at = t;
        atResults = [{ o, when }];
      } else if (t === at) {
        atResults.push({ o, when });
      }
    }
    let best: { mlPerMin: number; text: string; at: string } | undefined;
    for (const { o, when } of atResults) {
      const q = o.valueQuantity;
      if (!isObj(q) || typeof q.value !== 'number') {
        continue;
      }
      const unit = typeof q.code === 'string' ? q.code : typeof q.unit === 'string' ? q.unit : '';
      const factor = perMinute.codes.has(unit) ? 1 : perSecond.codes.has(unit) ? 60 : 0;
      if (factor === 0) {
        continue;
      }
      const comparator = typeof q.comparator === 'string' ? q.comparator : '';
      const mlPerMin = q.value * factor - (comparator === '<' ? 1e-9 : 0);
      if (!best || mlPerMin < best.mlPerMin) {
        // The value cut (not rounded) after one decimal: 29.95 is shown as 29.9.
        const shown = /^\d*(\.\d)?/.exec(String(q.value))?.[0] ?? String(q.value);
        const text = `${comparator}${shown} ${typeof q.unit === 'string' ? q.unit : unit}`;
        best = { mlPerMin, text, at: when };
      }
    }
    return best && { value: best.mlPerMin, text: best.text, at: best.at };
  };
  const egfrText = (e: { text: string; at: string }) => `${e.text} on ${e.at.slice(0, 10)}`;
  const meds = (prefetch: Json) =>
    [...entries(prefetch.medications), ...entries(prefetch.item2)].filter(
      (r) => r.resourceType === 'MedicationRequest',
    );
  return {
    ruleIds: ['warfarin-nsaid', 'nsaid-severe-ckd', 'metformin-low-egfr-review'],
    run(input) {
      const out = new Map<string, string>();
      const prefetch = input.prefetch;
      const now = input.now.getTime();
      if (input.hook === 'order-sign') {
        const drafts = entries(input.context.draftOrders).filter(
          (r) => r.resourceType === 'MedicationRequest',
        );
        const nsaidDraft = drafts.find((d) => conceptIn(d.medicationCodeableConcept, nsaids));
        if (!nsaidDraft) {
          return out;
        }
        const name = conceptName(nsaidDraft.medicationCodeableConcept);
        const onWarfarin = meds(prefetch).some(
          (m) =>
            conceptIn(m.medicationCodeableConcept, warfarin) &&
            (m.status === 'active' ||
              (typeof m.authoredOn === 'string' &&
                Date.parse(m.authoredOn) >= now - 100 * DAY_MS &&
                m.status !== 'entered-in-error' &&
                m.status !== 'cancelled' &&
                m.status !== 'draft')),
        );
        // A draft without an id gets warfarin-nsaid-draft-without-id instead (no delete action).
        if (onWarfarin && typeof nsaidDraft.id === 'string') {
          out.set('warfarin-nsaid', `Warfarin + ${name}: increased risk of bleeding`);
        }
        const e = latestEgfr(prefetch);
        if (e && e.value < 30) {
          out.set('nsaid-severe-ckd', `Avoid ${name}: latest eGFR is ${egfrText(e)}`);
        }
        return out;
      }
      const patient = prefetch.patient;
      const deceased =
        isObj(patient) &&
        (patient.deceasedBoolean === true ||
          (typeof patient.deceasedDateTime === 'string' &&
            Date.parse(patient.deceasedDateTime) <= now));
      if (deceased) {
        return out;
      }
      const onMetformin = meds(prefetch).some(
        (m) => m.status === 'active' && conceptIn(m.medicationCodeableConcept, metformin),
      );
      const e = onMetformin ? latestEgfr(prefetch) : undefined;
      // 30 to < 45 (below 30 is the pack's critical metformin-active-egfr-below-30 since 1.1.0).
      if (e && e.value >= 30 && e.value < 45) {
        out.set('metformin-low-egfr-review', `Review metformin: latest eGFR is ${egfrText(e)}`);
      }
      return out;
    },
  };
}
