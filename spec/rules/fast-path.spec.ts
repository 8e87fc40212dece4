/**
 * The FHIRPath fast path (issue 6) against fhirpath.js, its reference: every expression of the
 * shipped pack (lets, whens, card templates) over every Synthea patient, the whole engine with
 * and without the fast path, and fast-check generated resources with edge-case expressions.
 * The rule: where the fast path answers, it answers exactly what fhirpath.js answers (same
 * values, same FHIR types and paths); where fhirpath.js throws, the fast path does not answer.
 */
import { expect } from 'chai';
import fc from 'fast-check';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  buildRequestFromRecord,
  parsePackText,
  readPatientBundle,
  resolvePackFiles,
} from '../../rules/index.ts';
import type { EvaluationInput, RulePack, TraceEntry } from '../../rules/index.ts';
import { cardTextFields, compileProgram } from '../../rules/compile-pack.ts';
import type { PackProgram } from '../../rules/compile-pack.ts';
import { buildVariables, runRules } from '../../rules/evaluate-core.ts';
import {
  buildFunctionTable,
  compileExpression,
  indexValueSets,
  parseTemplate,
} from '../../rules/expression.ts';
import type { CompiledFn } from '../../rules/expression.ts';
import { compileFast, FAST_PATH_AVAILABLE, withFallback } from '../../rules/fast-path.ts';
import { readJson, SYNTHEA_DIR, syntheaManifest } from './content-fixtures.ts';

type Json = Record<string, unknown>;

const PACK_FILE = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../rules/packs/medication-safety/pack.yaml',
);
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
const LOINC = 'http://loinc.org';
const SCT = 'http://snomed.info/sct';

function loadPack(): RulePack {
  return resolvePackFiles(
    parsePackText(fs.readFileSync(PACK_FILE, 'utf8'), 'yaml'),
    path.dirname(PACK_FILE),
  ) as RulePack;
}

interface Expr {
  where: string;
  source: string;
  raw: boolean;
}

/** Every FHIRPath expression of a pack: lets (raw), whens and card interpolations (resolved). */
function packExpressions(pack: RulePack): Expr[] {
  const out: Expr[] = Object.entries(pack.let ?? {}).map(([name, source]) => ({
    where: `let.${name}`,
    source,
    raw: true,
  }));
  for (const rule of pack.rules) {
    out.push({ where: `${rule.id}.when`, source: rule.when, raw: false });
    for (const field of cardTextFields(rule.card)) {
      const parsed = parseTemplate(field.text);
      if (parsed.ok) {
        for (const part of parsed.parts) {
          if (part.kind === 'expr') {
            out.push({ where: `${rule.id}.${field.path}`, source: part.expr, raw: false });
          }
        }
      }
    }
  }
  return out;
}

/** A structural view of a result: nodes by data, path, type and place; FHIRPath values by class and text. */
function norm(v: unknown): unknown {
  if (Array.isArray(v)) {
    return v.map(norm);
  }
  if (v !== null && typeof v === 'object') {
    const o = v as Json;
    if ('parentResNode' in o && 'fhirNodeDataType' in o) {
      const parent = o.parentResNode as Json | null;
      return {
        node: {
          path: o.path,
          type: o.fhirNodeDataType,
          prop: o.propName,
          index: o.index,
          parentPath: parent ? parent.path : null,
          data: norm(o.data),
          extra: norm(o._data),
        },
      };
    }
    const proto = Object.getPrototypeOf(o) as unknown;
    if (proto !== Object.prototype && proto !== null) {
      const text = (o as { toString(): string }).toString();
      return { value: (o.constructor as { name: string }).name, text, json: JSON.stringify(o) };
    }
    return Object.fromEntries(
      Object.keys(o)
        .sort()
        .map((k) => [k, norm(o[k])]),
    );
  }
  return v;
}

type Outcome = { ok: true; value: unknown } | { ok: false; error: string };

function run(fn: CompiledFn, root: unknown, vars: Json): Outcome {
  try {
    return { ok: true, value: norm(fn(root, vars)) };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
}

/** Compiles expressions both ways, with the pack's function table. */
class Pair {
  readonly fast: CompiledFn | undefined;
  readonly slow: CompiledFn;
  readonly both: CompiledFn;
  constructor(
    readonly source: string,
    raw: boolean,
    valueSets: ReturnType<typeof indexValueSets>,
  ) {
    this.slow = compileExpression(source, buildFunctionTable(valueSets), raw);
    this.fast = compileFast(source, { raw, valueSets });
    this.both = withFallback(this.fast, this.slow);
  }
}

/** The variables of a call with every let computed by fhirpath.js (dependency order). */
function baseVariables(program: PackProgram, pack: RulePack, input: EvaluationInput): Json {
  const vars = buildVariables(program, input);
  const table = buildFunctionTable(program.valueSets);
  const pending = new Map(Object.entries(pack.let ?? {}));
  for (let round = 0; round < 50 && pending.size > 0; round++) {
    for (const [name, source] of [...pending]) {
      const deps = program.lets.get(name)?.deps ?? [];
      if (deps.every((d) => !pending.has(d))) {
        pending.delete(name);
        try {
          vars[name] = compileExpression(source, table, true)(input.context, vars);
        } catch {
          // Left out: the expressions reading it fail both ways.
        }
      }
    }
  }
  return vars;
}

const copy = (vars: Json): Json => Object.assign(Object.create(null) as Json, vars);

/** Compares one expression both ways on a call. Returns whether the fast path answered. */
function check(pair: Pair, root: unknown, vars: Json, label: string): boolean {
  if (!pair.fast) {
    return false;
  }
  const slow = run(pair.slow, root, copy(vars));
  const fast = run(pair.fast, root, copy(vars));
  if (!slow.ok) {
    expect(
      fast.ok,
      `${label}: fhirpath.js throws (${slow.error}) but the fast path answered`,
    ).to.equal(false);
    const both = run(pair.both, root, copy(vars));
    expect(both, `${label}: the fallback gives fhirpath.js's error`).to.deep.equal(slow);
    return false;
  }
  if (fast.ok) {
    expect(fast.value, `${label}: ${pair.source}`).to.deep.equal(slow.value);
  }
  return fast.ok;
}

function withoutDurations(
  entries: ReadonlyArray<TraceEntry | { name: string; status: string }>,
): unknown {
  return entries.map((e) => {
    const { durationMs: _d, ...rest } = e as TraceEntry;
    return rest;
  });
}

function runProgram(program: PackProgram, input: EvaluationInput, ruleIds: string[]): unknown {
  const trace: TraceEntry[] = [];
  const cards: unknown[] = [];
  const lets: Array<{ name: string; status: string }> = [];
  runRules(program, structuredClone(input), ruleIds, {
    onLet: (e) => lets.push(e),
    onRule: (e, card) => {
      trace.push(e);
      if (card) {
        cards.push(card);
      }
    },
  });
  return { trace: withoutDurations(trace), lets: withoutDurations(lets), cards };
}

// ------------------------------------------------------------------------------------------
// Generated data.

const dateTimeArb = fc.oneof(
  fc
    .record({
      y: fc.integer({ min: 1930, max: 2035 }),
      mo: fc.integer({ min: 1, max: 12 }),
      d: fc.integer({ min: 1, max: 28 }),
      h: fc.integer({ min: 0, max: 23 }),
      mi: fc.integer({ min: 0, max: 59 }),
      s: fc.integer({ min: 0, max: 59 }),
      tz: fc.constantFrom('Z', '+00:00', '-05:00', '+09:30', ''),
      ms: fc.constantFrom('', '.123', '.5'),
      precision: fc.constantFrom<'year' | 'month' | 'day' | 'minute' | 'second'>(
        'year',
        'month',
        'day',
        'minute',
        'second',
        'second',
        'second',
      ),
    })
    .map(({ y, mo, d, h, mi, s, tz, ms, precision }) => {
      const p2 = (n: number) => String(n).padStart(2, '0');
      const date = `${y}-${p2(mo)}-${p2(d)}`;
      switch (precision) {
        case 'year':
          return String(y);
        case 'month':
          return `${y}-${p2(mo)}`;
        case 'day':
          return date;
        case 'minute':
          return `${date}T${p2(h)}:${p2(mi)}${tz || 'Z'}`;
        case 'second':
          return `${date}T${p2(h)}:${p2(mi)}:${p2(s)}${ms}${tz}`;
      }
    }),
  fc.constantFrom('not a date', '2020-13-45', ''),
);

const codes: Record<string, string[]> = {
  [RXNORM]: [
    '855332',
    '11289',
    '310965',
    '849574',
    '860975',
    '6809',
    '197604',
    '315749',
    '902621',
    '1049221',
    '563026',
    '1191',
    '999999',
  ],
  [LOINC]: ['33914-3', '62238-1', '4548-4', '17856-6', '10535-3', '8867-4'],
  [SCT]: ['44054006', '73211009', '12847006', '15777000', '38341003'],
};

const codingArb = (systems: string[]) =>
  fc
    .record({
      system: fc.constantFrom(...systems),
      withSystem: fc.boolean(),
      pick: fc.nat(),
      display: fc.option(fc.constantFrom('Drug A', 'Lab B', 'Problem C'), { nil: undefined }),
    })
    .map(({ system, withSystem, pick, display }) => {
      const list = codes[system] ?? ['x'];
      const coding: Json = { code: list[pick % list.length] };
      if (withSystem) {
        coding.system = system;
      }
      if (display !== undefined) {
        coding.display = display;
      }
      return coding;
    });

const conceptArb = (systems: string[]) =>
  fc
    .record({
      coding: fc.array(codingArb(systems), { minLength: 0, maxLength: 2 }),
      text: fc.option(fc.constantFrom('Named thing', 'Other'), { nil: undefined }),
    })
    .map(({ coding, text }) => (text === undefined ? { coding } : { coding, text }));

const maybe = <T>(arb: fc.Arbitrary<T>) => fc.option(arb, { nil: undefined, freq: 3 });

function clean(o: Json): Json {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

const medArb = fc
  .record({
    id: fc.constantFrom('m1', 'm2', 'm3', 'm4'),
    status: maybe(
      fc.constantFrom('active', 'completed', 'stopped', 'draft', 'entered-in-error', 'cancelled'),
    ),
    authoredOn: maybe(dateTimeArb),
    concept: maybe(conceptArb([RXNORM])),
    // A medicationReference to a Medication resource, or to one the request contains ('#med1').
    ref: fc.constantFrom('none', 'none', 'resource', 'contained'),
    statusExt: fc.boolean(),
  })
  .map(({ id, status, authoredOn, concept, ref, statusExt }) =>
    clean({
      resourceType: 'MedicationRequest',
      id,
      status,
      _status: statusExt ? { extension: [{ url: 'http://x', valueString: 'y' }] } : undefined,
      intent: 'order',
      authoredOn,
      contained:
        ref === 'contained'
          ? [clean({ resourceType: 'Medication', id: 'med1', code: concept })]
          : undefined,
      medicationCodeableConcept: ref === 'none' ? concept : undefined,
      medicationReference:
        ref === 'resource'
          ? { reference: 'Medication/1' }
          : ref === 'contained'
            ? { reference: '#med1' }
            : undefined,
      subject: { reference: 'Patient/p1' },
    }),
  );

const obsArb = fc
  .record({
    id: fc.constantFrom('o1', 'o2', 'o3', 'o4', 'o5'),
    status: maybe(
      fc.constantFrom(
        'final',
        'amended',
        'corrected',
        'preliminary',
        'registered',
        'entered-in-error',
        'cancelled',
      ),
    ),
    code: conceptArb([LOINC]),
    value: fc.oneof(
      fc
        .record({
          value: fc.oneof(
            fc.integer({ min: 0, max: 200 }),
            fc.double({ min: 0, max: 200, noNaN: true, noDefaultInfinity: true }),
            fc.constantFrom(0.5, 0.75, 29.95, 30, 45),
          ),
          unit: fc.constantFrom('mL/min/{1.73_m2}', 'mL/min', 'mL/s/{1.73_m2}', 'mL/min/m2', '%'),
          ucum: fc.boolean(),
          comparator: maybe(fc.constantFrom('<', '<=', '>', '>=')),
        })
        .map(({ value, unit, ucum, comparator }) => ({
          // With a UCUM code, the code is what the pack reads; the text unit may differ.
          valueQuantity: clean({
            value,
            comparator,
            unit: ucum ? 'mL/min/1.73m2' : unit,
            system: ucum ? 'http://unitsofmeasure.org' : undefined,
            code: ucum ? unit : undefined,
          }),
        })),
      fc
        .constantFrom(
          'positive',
          '<15',
          '>60',
          '< 30',
          '>=90',
          '<=45.5',
          '29.95',
          '7',
          '<',
          '1234',
          '.5',
          '30.',
          '15|2',
        )
        .map((v) => ({ valueString: v })),
      fc.constant({}),
    ),
    effective: fc.oneof(
      dateTimeArb.map((d) => ({ effectiveDateTime: d })),
      fc.constant({ effectivePeriod: { start: '2019-01-01' } }),
      dateTimeArb.map((d) => ({ effectivePeriod: { start: d } })),
      dateTimeArb.map((d) => ({ effectiveInstant: d })),
      fc.constant({}),
    ),
    issued: maybe(dateTimeArb),
  })
  .map(({ id, status, code, value, effective, issued }) =>
    clean({
      resourceType: 'Observation',
      id,
      status,
      code,
      ...value,
      ...effective,
      issued,
      subject: { reference: 'Patient/p1' },
    }),
  );

const statusConcept = (values: string[]) =>
  fc.constantFrom(...values).map((code) => ({ coding: [{ system: 'http://x', code }] }));

const conditionArb = fc
  .record({
    id: fc.constantFrom('c1', 'c2', 'c3'),
    clinicalStatus: maybe(statusConcept(['active', 'resolved', 'inactive'])),
    verificationStatus: maybe(statusConcept(['confirmed', 'refuted', 'entered-in-error'])),
    code: conceptArb([SCT]),
  })
  .map((r) => clean({ resourceType: 'Condition', ...r, subject: { reference: 'Patient/p1' } }));

const allergyArb = fc
  .record({
    id: fc.constantFrom('a1', 'a2'),
    clinicalStatus: maybe(statusConcept(['active', 'inactive'])),
    verificationStatus: maybe(statusConcept(['confirmed', 'refuted', 'entered-in-error'])),
    code: conceptArb([RXNORM]),
  })
  .map((r) =>
    clean({ resourceType: 'AllergyIntolerance', ...r, patient: { reference: 'Patient/p1' } }),
  );

const patientArb = fc
  .record({
    birthDate: maybe(dateTimeArb.map((d) => d.slice(0, 10))),
    deceased: fc.oneof(
      fc.constant({}),
      fc.boolean().map((b) => ({ deceasedBoolean: b })),
      dateTimeArb.map((d) => ({ deceasedDateTime: d })),
    ),
    gender: maybe(fc.constantFrom('male', 'female')),
  })
  .map(({ birthDate, deceased, gender }) =>
    clean({
      resourceType: 'Patient',
      id: 'p1',
      birthDate,
      gender,
      name: [{ given: ['Ada', 'B'], family: 'Lovelace' }],
      ...deceased,
    }),
  );

const bundle = (resources: Json[]) => ({
  resourceType: 'Bundle',
  type: 'searchset',
  entry: resources.map((resource) => ({ resource })),
});

const callArb = fc
  .record({
    patient: patientArb,
    meds: fc.array(medArb, { maxLength: 5 }),
    obs: fc.array(obsArb, { maxLength: 6 }),
    conditions: fc.array(conditionArb, { maxLength: 3 }),
    allergies: fc.array(allergyArb, { maxLength: 2 }),
    drafts: fc.array(
      medArb.map((m) => ({ ...m, status: 'draft' })),
      { maxLength: 3 },
    ),
    pddiKeys: fc.boolean(),
    nullLabs: fc.boolean(),
    now: fc.date({
      min: new Date('2000-01-01T00:00:00Z'),
      max: new Date('2030-12-31T00:00:00Z'),
      noInvalidDate: true,
    }),
  })
  .map(
    ({
      patient,
      meds,
      obs,
      conditions,
      allergies,
      drafts,
      pddiKeys,
      nullLabs,
      now,
    }): EvaluationInput => {
      const prefetch: Json = {
        patient,
        medications: bundle(meds),
        conditions: bundle(conditions),
        labs: nullLabs ? null : bundle(obs),
        allergies: bundle(allergies),
      };
      if (pddiKeys) {
        prefetch.item2 = bundle(meds.slice(0, 1));
        prefetch.item6 = bundle([...conditions.slice(0, 1), ...obs.slice(0, 1)]);
      }
      return {
        hook: 'order-sign',
        hookInstance: 'h1',
        now,
        context: {
          userId: 'Practitioner/1',
          patientId: 'p1',
          draftOrders: bundle(drafts),
          selections: drafts.slice(0, 1).map((d) => `MedicationRequest/${String((d as Json).id)}`),
        },
        prefetch,
      };
    },
  );

/** Expressions beyond the shipped pack: each construct of the subset, and its edges. */
const EDGE_EXPRESSIONS: Array<[string, boolean]> = [
  ['%context.patientId', false],
  ['$this.patientId', false],
  ['patientId', false],
  ['%context.where($this.patientId.exists())', true],
  ['%context.select(Object)', true],
  ['%context.select(patientId)', false],
  ['%patient.select(Patient.name).given', false],
  ['%patient.name.given | %patient.name.family', false],
  ['%patient.name.select(given.first())', false],
  ['%patient.name.given.isDistinct()', false],
  ["%patient.gender = 'male'", false],
  ['%patient.gender != %patient.gender', false],
  ['%patient.deceased = true', false],
  ['%patient.deceased.ofType(boolean).not()', false],
  ['%patient.birthDate < @2000-01-01', false],
  ['%patient.birthDate > @1980', false],
  ['%patient.birthDate.toString().substring(0, 4)', false],
  ['%patient.birthDate.toString().substring(2)', false],
  ['%patient.birthDate + 1 year', true],
  ['%medications.select(status)', true],
  ['%medications.status.distinct()', false],
  ['%medications.status.isDistinct()', false],
  ['%medications.count() > 1', false],
  ['%medications.count() > 0.5', false],
  ['%medications.first().authoredOn < %now', false],
  ['%medications.authoredOn >= %now - 100 days', false],
  ['%medications.authoredOn.first() >= %medications.authoredOn.first()', false],
  ['%medications.authoredOn.first() > %medications.authoredOn.first()', false],
  ['%medications.authoredOn.first() <= %medications.authoredOn.last()', false],
  ['%medications.authoredOn.first() < %medications.authoredOn.last()', false],
  ['%patient.birthDate >= %patient.birthDate', false],
  ['%now >= %now', false],
  ['%today <= %today', false],
  ['1 <= 1.0', false],
  ['2 > 1', false],
  [
    '%observations.value.ofType(Quantity).value.first() >= %observations.value.ofType(Quantity).value.first()',
    false,
  ],
  ['%observations.value.ofType(Quantity).value.first() < 30', false],
  ['%medications.where(authoredOn >= %now - 100 days).id', false],
  ['%medications.authoredOn.sort()', true],
  ['%medications.sort(authoredOn).id', false],
  ['%medications.sort(authoredOn desc).id', false],
  ['%medications[0].id', false],
  ['%medications[99]', true],
  ["%medications.all(status = 'active')", false],
  [
    '%medications.medication.ofType(CodeableConcept).coding.code.intersect(%draftMeds.medication.ofType(CodeableConcept).coding.code)',
    false,
  ],
  ['%medications.medication.ofType(Reference).reference', false],
  ['%medications.medication.ofType(CodeableConcept).select(text | coding.display).first()', false],
  ['%observations.sort(effective.ofType(dateTime)).first().id', false],
  ['%observations.sort(effective.ofType(dateTime).lowBoundary()).last().id', false],
  ['%observations.sort(effective.ofType(dateTime).lowBoundary() desc).select(id)', false],
  [
    '%observations.where(effective.ofType(dateTime).toString().length() = 25).sort(effective.ofType(dateTime).lowBoundary()).select(id)',
    false,
  ],
  ['%observations.first().effective.ofType(dateTime).lowBoundary()', true],
  ['%observations.first().effective.ofType(dateTime).highBoundary()', true],
  ['%observations.effective.ofType(dateTime).lowBoundary()', true],
  ['%observations.first().effective.ofType(dateTime).lowBoundary() < @2020-01-01T00:00:00Z', false],
  ['%observations.value.ofType(Quantity).value.round(0)', true],
  ['%observations.value.ofType(Quantity).value.round()', false],
  ['%observations.value.ofType(Quantity).value.first() + 1', true],
  ['%observations.value.ofType(Quantity).value.first() - 0.5', true],
  ["%observations.value.ofType(Quantity).unit.first() + '!'", false],
  ['%observations.value.ofType(string)', true],
  ['%observations.effective.ofType(Period).start', true],
  ["%observations.where(status != 'final').count()", false],
  ["%conditions.code.coding.where(system = 'http://snomed.info/sct').code", true],
  ["%conditions.code.inValueSet('diabetes')", false],
  ["%allergies.code.coding.code.inValueSet('nsaids')", false],
  ["iif(%medications.exists(), 'yes', 'no')", false],
  ['iif(%medications.empty(), 1)', false],
  ["%medications.iif($this.count() > 1, 'many', 'few')", false],
  ['{} and true', false],
  ['false and (1 | 2).not()', false],
  ['true or (1 | 2).not()', false],
  ['false and %undefinedVariable.exists()', false],
  ["false and %medications.where(status = 'active').exists()", false],
  ['true or %medications.status.exists()', false],
  ['false implies %medications.exists()', false],
  ['%medications.exists() and %medications.status.not()', false],
  ['%medications.empty() and %medications.status.not()', false],
  ['%medications.empty() and %medications.authoredOn > %now', false],
  ['%medications.exists() and %medications.first().status.not()', false],
  [
    "%observations.where(code.inValueSet('egfr') and value.ofType(Quantity).value.exists()).id",
    false,
  ],
  ['%medications.where(status).id', false],
  ["%medications.where(id = 'm1').status = %medications.where(id = 'm1').status", false],
  ["%medications.where(status = 'active' and authoredOn.exists()).id", false],
  ['{} or false', false],
  ['true xor false', false],
  ['false implies {}', false],
  ['%medications.exists() implies %draftMeds.exists()', false],
  ["'a' + 'b'", false],
  ["'a' < 'b'", false],
  ['1 + 2.5', true],
  ['%now - 1 day', true],
  ['%today + 2 weeks', true],
  ['now() = %now', false],
  ['today() < %now', false],
  ['(1 | 2).not()', false],
  ['%nsaids.count()', false],
  ['%selections.count()', false],
  ['%ucum', false],
  ['%undefinedVariable', false],
  ['%now.lowBoundary()', true],
  ['%today.highBoundary()', false],
  ['%patient.birthDate.lowBoundary()', true],
  ['%patient.birthDate.highBoundary(8)', false],
  ['%patient.deceased.ofType(dateTime).lowBoundary(6)', false],
  ['1.5.lowBoundary(3)', false],
  ['1.highBoundary()', false],
  ["'a'.lowBoundary()", false],
  ['%patient.name.given.lowBoundary()', false],
  ['%nsaids.count().lowBoundary(%patient.name.given.count())', false],
  ["%medications.status.trace('x')", false],
];

describe('rules: FHIRPath fast path (differential against fhirpath.js)', function () {
  this.timeout(300_000);
  const pack = loadPack();
  const valueSets = indexValueSets(pack.valueSets);
  const exprs = packExpressions(pack);
  const pairs = exprs.map((e) => ({ e, pair: new Pair(e.source, e.raw, valueSets) }));
  const fastProgram = compileProgram(pack, 'fast');
  const slowProgram = compileProgram(pack, 'slow', { fastPath: false });
  const edges = EDGE_EXPRESSIONS.map(([source, raw]) => new Pair(source, raw, valueSets));

  it('is available with the installed fhirpath.js', () => {
    expect(FAST_PATH_AVAILABLE).to.equal(true);
  });

  it('compiles every expression of the shipped pack', () => {
    const refused = pairs.filter(({ pair }) => !pair.fast).map(({ e }) => e.where);
    expect(refused).to.deep.equal([]);
  });

  describe('over every Synthea patient', () => {
    const manifest = syntheaManifest();
    const calls: Array<{ label: string; input: EvaluationInput; service: string }> = [];
    for (const p of manifest) {
      const record = readPatientBundle(readJson(path.join(SYNTHEA_DIR, p.file)));
      const now = new Date(`${p.last_encounter}T23:59:59Z`);
      for (const service of pack.services) {
        const drafts =
          service.hook === 'patient-view'
            ? undefined
            : [
                {
                  resourceType: 'MedicationRequest',
                  id: 'draft-ibuprofen',
                  status: 'draft',
                  intent: 'order',
                  medicationCodeableConcept: {
                    coding: [
                      { system: RXNORM, code: '310965', display: 'Ibuprofen 200 MG Oral Tablet' },
                    ],
                  },
                },
              ];
        const request = buildRequestFromRecord(
          drafts ? { service, record, draftOrders: drafts } : { service, record },
        );
        calls.push({
          label: `${p.file.split('_').slice(0, 2).join('_')} ${service.hook}`,
          service: service.id,
          input: {
            hook: request.hook,
            hookInstance: 'h',
            context: request.context,
            prefetch: request.prefetch ?? {},
            now,
          },
        });
      }
    }

    it('answers every expression of the pack, exactly as fhirpath.js does', () => {
      let answered = 0;
      let compared = 0;
      for (const call of calls) {
        const vars = baseVariables(slowProgram, pack, call.input);
        for (const { e, pair } of pairs) {
          compared++;
          answered += check(pair, call.input.context, vars, `${call.label} ${e.where}`) ? 1 : 0;
        }
      }
      // Every expression is answered by the fast path unless fhirpath.js itself fails.
      expect(answered).to.be.greaterThan(compared * 0.95);
    });

    it('gives the engine identical traces, lets and cards with and without the fast path', () => {
      for (const call of calls) {
        const ruleIds = pack.rules.filter((r) => r.service === call.service).map((r) => r.id);
        expect(runProgram(fastProgram, call.input, ruleIds), call.label).to.deep.equal(
          runProgram(slowProgram, call.input, ruleIds),
        );
      }
    });
  });

  describe('on generated resources', () => {
    it('answers every pack expression exactly as fhirpath.js, or leaves it to fhirpath.js', () => {
      fc.assert(
        fc.property(callArb, (input) => {
          const vars = baseVariables(slowProgram, pack, input);
          for (const { e, pair } of pairs) {
            check(pair, input.context, vars, e.where);
          }
        }),
        { numRuns: 150 },
      );
    });

    it('gives the engine identical results with and without the fast path', () => {
      const ruleIds = pack.rules
        .filter((r) => r.service === 'medication-safety-order-sign')
        .map((r) => r.id);
      const selectIds = pack.rules
        .filter((r) => r.service === 'medication-safety-order-select')
        .map((r) => r.id);
      fc.assert(
        fc.property(callArb, (input) => {
          expect(runProgram(fastProgram, input, ruleIds)).to.deep.equal(
            runProgram(slowProgram, input, ruleIds),
          );
          expect(runProgram(fastProgram, input, selectIds)).to.deep.equal(
            runProgram(slowProgram, input, selectIds),
          );
        }),
        { numRuns: 100 },
      );
    });

    it('agrees with fhirpath.js on edge-case expressions', () => {
      let answered = 0;
      fc.assert(
        fc.property(callArb, (input) => {
          const vars = baseVariables(slowProgram, pack, input);
          for (const pair of edges) {
            answered += check(pair, input.context, vars, pair.source) ? 1 : 0;
          }
        }),
        { numRuns: 120 },
      );
      expect(answered).to.be.greaterThan(0);
    });
  });

  describe('falling back', () => {
    it('leaves to fhirpath.js what it does not compile, and gives fhirpath.js errors', () => {
      for (const source of [
        "%medications.status.trace('x')",
        '-(1)',
        '%medications.repeat(id)',
        '%undefinedVariable',
      ]) {
        const pair = new Pair(source, false, valueSets);
        const vars: Json = {
          ...buildVariables(slowProgram, {
            hook: 'h',
            hookInstance: 'h',
            context: {},
            prefetch: {},
            now: new Date(),
          }),
        };
        vars.medications = [];
        expect(run(pair.both, {}, copy(vars))).to.deep.equal(run(pair.slow, {}, copy(vars)));
      }
      expect(new Pair('%medications.repeat(id)', false, valueSets).fast).to.equal(undefined);
    });

    it('hands an evaluation it cannot do to fhirpath.js (a union of numbers)', () => {
      const pair = new Pair('(1 | 2 | 2).count()', false, valueSets);
      expect(pair.fast).to.not.equal(undefined);
      const vars = copy({});
      expect(() => pair.fast?.({}, copy(vars))).to.throw();
      expect(run(pair.both, {}, copy(vars))).to.deep.equal({ ok: true, value: [2] });
    });
  });
});
