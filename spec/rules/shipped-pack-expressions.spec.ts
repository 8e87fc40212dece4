/**
 * The shipped medication-safety pack, checked with fhirpath.js directly (independently of the
 * rules engine): every `let` and `when` over the requests of the pack's own tests, and two
 * whole-corpus sweeps over the 53 Synthea patients compared with plain TypeScript oracles; then
 * through the engine, the card texts and the fixes of the 1.2.0 clinical review
 * (spec/fixtures/packs/medication-safety/).
 */
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import {
  buildRequestFromRecord,
  compilePack,
  createEvaluator,
  evaluateInline,
  PackValidationError,
  parsePackText,
  readPatientBundle,
  validatePack,
} from '../../rules/index.ts';
import type { PackTest, PackTestRequest, RulePack } from '../../rules/index.ts';
import { readJson, SYNTHEA_DIR, syntheaManifest } from './content-fixtures.ts';
import { isObject, PackExpressions } from './pack-expressions.ts';

type Json = Record<string, unknown>;

const PACK_DIR = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../rules/packs/medication-safety',
);
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
const REVIEW_DIR = path.resolve(PACK_DIR, '../../../spec/fixtures/packs/medication-safety');
const EGFR_LOINC = new Set(['33914-3', '62238-1', '98979-8', '48642-3', '48643-1', '50044-7']);

/** The pack, read as a rule author's file: YAML. */
function loadPack(): RulePack {
  return YAML.parse(fs.readFileSync(path.join(PACK_DIR, 'pack.yaml'), 'utf8')) as RulePack;
}

function requestOf(pack: RulePack, test: PackTest): PackTestRequest {
  if (test.request) {
    return test.request;
  }
  if (test.requestFile) {
    return readJson(path.resolve(PACK_DIR, test.requestFile)) as PackTestRequest;
  }
  const service = pack.services.find((s) => s.id === test.service)!;
  const record = readPatientBundle(readJson(path.resolve(PACK_DIR, test.patientBundle!)));
  return buildRequestFromRecord(
    test.draftOrders ? { service, record, draftOrders: test.draftOrders } : { service, record },
  );
}

/** The resources of a prefetch (searchset Bundles, or single resources), of every key. */
function prefetchResources(request: PackTestRequest): Json[] {
  const out: Json[] = [];
  for (const value of Object.values(request.prefetch ?? {})) {
    if (isObject(value) && value.resourceType === 'Bundle' && Array.isArray(value.entry)) {
      for (const e of value.entry as unknown[]) {
        if (isObject(e) && isObject(e.resource)) {
          out.push(e.resource);
        }
      }
    } else if (isObject(value)) {
      out.push(value);
    }
  }
  return out;
}

function codesOf(concept: unknown): string[] {
  return isObject(concept) && Array.isArray(concept.coding)
    ? (concept.coding as unknown[]).flatMap((c) =>
        isObject(c) && typeof c.code === 'string' ? [c.code] : [],
      )
    : [];
}

/** The instant a result is dated by: effective dateTime, Period start or instant, else issued. */
function resultTime(o: Json): number | undefined {
  const period = isObject(o.effectivePeriod) ? o.effectivePeriod.start : undefined;
  for (const v of [o.effectiveDateTime, period, o.effectiveInstant, o.issued]) {
    if (typeof v === 'string') {
      const t = Date.parse(v);
      return Number.isNaN(t) ? undefined : t;
    }
  }
  return undefined;
}

/**
 * An eGFR result in mL/min/1.73 m2: a Quantity in mL/min or mL/s, its unit (UCUM code, else
 * text) spelled in any of the usual ways (case, spaces, braces, `^2`, with or without
 * `/1.73 m2`), or a text like "<15" or "29.5".
 */
function egfrMlPerMin(o: Json): number | undefined {
  const q = o.valueQuantity;
  if (isObject(q) && typeof q.value === 'number') {
    const raw = typeof q.code === 'string' ? q.code : q.unit;
    const unit =
      typeof raw === 'string'
        ? raw
            .toLowerCase()
            .replace(/[\s^{}_]/g, '')
            .replace(/\u00b2/g, '2')
            .replace(/\.m2/g, 'm2')
            .replace(/per/g, '/')
        : undefined;
    // "<X" is just under X; "<=", ">" and ">=" are read at X (none changes a "< 30" test).
    const v = q.comparator === '<' ? q.value - 1e-9 : q.value;
    if (unit !== undefined && /^ml\/min(\/1\.73m2)?$/.test(unit)) {
      return v;
    }
    if (unit !== undefined && /^ml\/s(\/1\.73m2)?$/.test(unit)) {
      return v * 60;
    }
    return undefined;
  }
  const m =
    typeof o.valueString === 'string'
      ? /^(<=|>=|<|>)? ?(\d{1,3}(\.\d{1,2})?)$/.exec(o.valueString)
      : null;
  return m ? Number(m[2]) - (m[1] === '<' ? 1e-9 : 0) : undefined;
}

/**
 * RULES.md R4, written here without the pack's FHIRPath: the eGFR results that count (final,
 * amended, corrected, preliminary), are dated and can be read; the latest of them (a newer
 * result that cannot be read does not hide it, 1.3.0); at that instant, the lowest value.
 */
function latestEgfrOracle(resources: Json[]): number | undefined {
  const results = resources
    .filter(
      (r) =>
        r.resourceType === 'Observation' &&
        ['final', 'amended', 'corrected', 'preliminary'].includes(String(r.status)) &&
        codesOf(r.code).some((c) => EGFR_LOINC.has(c)),
    )
    .map((r) => ({ t: resultTime(r), v: egfrMlPerMin(r) }))
    .filter((x): x is { t: number; v: number } => x.t !== undefined && x.v !== undefined);
  if (results.length === 0) {
    return undefined;
  }
  const latest = Math.max(...results.map((x) => x.t));
  return Math.min(...results.filter((x) => x.t === latest).map((x) => x.v));
}

/** A request of spec/fixtures/packs/medication-safety/. */
function reviewRequest(name: string): PackTestRequest {
  return readJson(path.join(REVIEW_DIR, `${name}.json`)) as PackTestRequest;
}

function draft(code: string, display: string): Json {
  return {
    resourceType: 'MedicationRequest',
    status: 'draft',
    intent: 'order',
    medicationCodeableConcept: { coding: [{ system: RXNORM, code, display }], text: display },
  };
}

describe('rules/packs/medication-safety expressions (fhirpath.js directly)', () => {
  const pack = loadPack();
  const exprs = new PackExpressions(pack);

  it('has the three services, unique rule ids, and rules on every service', () => {
    expect(pack.services.map((s) => s.hook).sort()).to.deep.equal([
      'order-select',
      'order-sign',
      'patient-view',
    ]);
    const ids = pack.rules.map((r) => r.id);
    expect(new Set(ids).size).to.equal(ids.length);
    for (const service of pack.services) {
      expect(
        pack.rules.some((r) => r.service === service.id),
        service.id,
      ).to.equal(true);
    }
  });

  it('carries the real codes the rules and tests rely on', () => {
    const has = (set: string, code: string) =>
      pack.valueSets![set]!.codes.some((c) => c.code === code);
    // Synthea and PDDI IG drugs (RULES.md R1, R3, R4): warfarin, NSAIDs, digoxin, cyclosporine.
    for (const code of ['855332', '855350', '11289']) {
      expect(has('warfarin', code), code).to.equal(true);
    }
    for (const code of ['849574', '198014', '310965', '198405', '834022', '5640']) {
      expect(has('nsaids', code), code).to.equal(true);
    }
    // Topical forms are excluded (PDDI exclude sets), aspirin is not an NSAID here.
    expect(has('nsaids', '141998'), 'ibuprofen topical cream').to.equal(false);
    expect(has('nsaids', '855633'), 'diclofenac topical gel').to.equal(false);
    expect(has('nsaids', '1191'), 'aspirin').to.equal(false);
    expect(has('digoxin', '197604') && has('cyclosporine', '315749')).to.equal(true);
    expect(has('cyclosporine', '402092'), 'ophthalmic cyclosporine').to.equal(false);
    expect(has('benzodiazepines', '563026') && has('opioids', '1049221')).to.equal(true);
    expect(
      has('egfr', '33914-3') && has('hba1c', '4548-4') && has('diabetes', '44054006'),
    ).to.equal(true);
    expect(has('diabetes', '15777000'), 'prediabetes').to.equal(false);
    // Metformin products (1.3.0, openFDA NDC directory): 1000 mg, 850 mg, ER and combinations.
    for (const code of ['6809', '861004', '861007', '861010', '860975', '861736', '1243827']) {
      expect(has('metformin', code), code).to.equal(true);
    }
  });

  describe('its embedded tests', () => {
    for (const [i, test] of (pack.tests ?? []).entries()) {
      it(`tests[${i}] ${test.name}`, () => {
        const request = requestOf(pack, test);
        const now = new Date(test.now ?? Date.now());
        const vars = exprs.variables(request, now);
        const fired = exprs.fired(test.service, request, vars);
        for (const id of test.expect.fire ?? []) {
          expect(fired, `${id} should fire`).to.include(id);
        }
        for (const id of test.expect.notFire ?? []) {
          expect(fired, `${id} should not fire`).not.to.include(id);
        }
        // The cards of the fired rules render, with a summary under 140 characters.
        for (const rule of pack.rules.filter((r) => fired.includes(r.id))) {
          const summary = exprs.render(rule.card.summary, request, vars);
          expect(summary.length, `${rule.id} summary: ${summary}`).to.be.below(140);
          expect(summary).not.to.match(/\{\{|\s:/);
          if (rule.card.detail !== undefined) {
            expect(exprs.render(rule.card.detail, request, vars)).to.be.a('string');
          }
          for (const s of rule.card.suggestions ?? []) {
            expect(exprs.render(s.label, request, vars)).not.to.equal('');
            for (const a of s.actions ?? []) {
              if (a.resourceId !== undefined) {
                // A delete names the draft by id, always (CDS Hooks 2.0 resourceId Type/id): a
                // draft sent without an id gets warfarin-nsaid-draft-without-id instead.
                const resourceId = exprs.render(a.resourceId, request, vars);
                expect(resourceId, `${rule.id} ${s.label}`).to.match(/^MedicationRequest\/\S+$/);
              }
            }
          }
        }
      });
    }
  });

  describe('over all 53 Synthea patients', () => {
    const manifest = syntheaManifest();
    const records = manifest.map((p) => ({
      p,
      record: readPatientBundle(readJson(path.join(SYNTHEA_DIR, p.file))),
      now: new Date(`${p.last_encounter}T23:59:59Z`),
    }));
    const short = (file: string) => file.split('_').slice(0, 2).join('_');

    it('patient-view at each last encounter fires exactly for the RULES.md patients', () => {
      const service = pack.services.find((s) => s.hook === 'patient-view')!;
      const firedBy = new Map<string, string[]>();
      for (const { p, record, now } of records) {
        const request = buildRequestFromRecord({ service, record });
        for (const id of exprs.fired(service.id, request, exprs.variables(request, now))) {
          firedBy.set(id, [...(firedBy.get(id) ?? []), short(p.file)]);
        }
      }
      // RULES.md R1: 7 patients have warfarin and an NSAID active; Eddie_Lakin, Jacob_King and
      // Sherman_McGlynn are already dead at their last recorded encounter (deceased guard).
      expect(firedBy.get('warfarin-nsaid-active')?.sort()).to.deep.equal([
        'Derek_Becker',
        'Isaura_Dietrich',
        'Kyla_Zulauf',
        'Mafalda_Turcotte',
      ]);
      // RULES.md R4: metformin with eGFR 30-45 (reassess) and < 30 (contraindicated: critical)
      // (Evelyn_McCullough died before her last encounter).
      expect(firedBy.get('metformin-low-egfr-review')?.sort()).to.deep.equal([
        'Clarine_OKeefe',
        'Isaiah_Schaden',
      ]);
      expect(firedBy.get('metformin-active-egfr-below-30')?.sort()).to.deep.equal([
        'Coleman_Ortiz',
        'Parker_Casper',
        'Tristan_Gleason',
      ]);
      // Diabetics are tested at their last encounter, where most had an HbA1c the same day.
      expect(firedBy.get('diabetes-hba1c-overdue')).to.deep.equal(['Coleman_Ortiz']);
      // RULES.md R8 (active problem-list variant, 1.4.0): opioid use disorder without
      // buprenorphine or methadone; Gilberto_Orosco and Sherman_McGlynn are already dead.
      expect(firedBy.get('oud-offer-moud')).to.deep.equal(['Virginia_Mercado']);
    });

    it('order-sign with an ibuprofen draft agrees with a TypeScript oracle for every patient', () => {
      const service = pack.services.find((s) => s.hook === 'order-sign')!;
      const ibuprofen = draft('310965', 'Ibuprofen 200 MG Oral Tablet');
      let warfarinCount = 0;
      let ckdCount = 0;
      for (const { p, record, now } of records) {
        const request = buildRequestFromRecord({ service, record, draftOrders: [ibuprofen] });
        const fired = exprs.fired(service.id, request, exprs.variables(request, now));
        const meds = record.resources.filter((r) => r.resourceType === 'MedicationRequest');
        const code = (r: Json) =>
          ((r.medicationCodeableConcept as { coding?: Array<{ code?: string }> } | undefined)
            ?.coding ?? [])[0]?.code;
        const hundredDaysAgo = now.getTime() - 100 * 24 * 3600 * 1000;
        const warfarin = meds.some(
          (r) =>
            code(r) === '855332' &&
            (r.status === 'active' ||
              (Date.parse(String(r.authoredOn)) >= hundredDaysAgo &&
                !['entered-in-error', 'cancelled', 'draft'].includes(String(r.status)))),
        );
        const latest = latestEgfrOracle(record.resources);
        const ckd = latest !== undefined && latest < 30;
        expect(fired.includes('warfarin-nsaid'), `${p.file} warfarin-nsaid`).to.equal(warfarin);
        expect(fired.includes('nsaid-severe-ckd'), `${p.file} nsaid-severe-ckd`).to.equal(ckd);
        warfarinCount += warfarin ? 1 : 0;
        ckdCount += ckd ? 1 : 0;
      }
      // RULES.md: 10 warfarin-active patients; 6 deceased naproxen users + Ali_Herman under 30.
      expect(warfarinCount).to.equal(10);
      expect(ckdCount).to.be.greaterThanOrEqual(7);
    });
  });

  describe('through the rules engine', () => {
    it('validates, and passes all its embedded tests (validatePack)', async () => {
      const raw = parsePackText(fs.readFileSync(path.join(PACK_DIR, 'pack.yaml'), 'utf8'));
      // Generous budgets: the first call of a fresh worker also compiles the pack's FHIRPath.
      const evaluator = createEvaluator({ callBudgetMs: 30000, ruleBudgetMs: 10000 });
      try {
        const compiled = await validatePack(raw, { baseDir: PACK_DIR, evaluator });
        expect(compiled.id).to.equal('medication-safety');
        expect(compiled.pack.tests?.length).to.equal(pack.tests?.length);
      } catch (err) {
        if (err instanceof PackValidationError) {
          expect.fail(err.problems.map((p) => `${p.path}: ${p.message}`).join('\n'));
        }
        throw err;
      } finally {
        await evaluator.close();
      }
    });

    // An eGFR dated by day only next to one with a time on the same day: a plain sort() of
    // the two throws ("incomparable"), which failed the let and every metformin/NSAID card.
    it('takes the latest eGFR across mixed date precisions (critical card kept)', () => {
      const compiled = compilePack(loadPack());
      const obs = (id: string, effectiveDateTime: string, value: number) => ({
        resource: {
          resourceType: 'Observation',
          id,
          status: 'final',
          code: { coding: [{ system: 'http://loinc.org', code: '33914-3' }] },
          subject: { reference: 'Patient/p' },
          effectiveDateTime,
          valueQuantity: { value, unit: 'mL/min/{1.73_m2}' },
        },
      });
      const metformin = {
        resourceType: 'MedicationRequest',
        id: 'd1',
        status: 'draft',
        intent: 'order',
        subject: { reference: 'Patient/p' },
        medicationCodeableConcept: { coding: [{ system: RXNORM, code: '861007' }] },
      };
      const run = (first: string, second: string) =>
        evaluateInline(compiled, 'medication-safety-order-sign', {
          hook: 'order-sign',
          hookInstance: 'd1577c69-dfbe-44ad-ba6d-3e05e953b2ea',
          now: new Date('2021-03-10T12:00:00Z'),
          context: {
            patientId: 'p',
            userId: 'Practitioner/u',
            draftOrders: {
              resourceType: 'Bundle',
              type: 'collection',
              entry: [{ resource: metformin }],
            },
          },
          prefetch: {
            patient: { resourceType: 'Patient', id: 'p', birthDate: '1950-01-01' },
            labs: {
              resourceType: 'Bundle',
              type: 'searchset',
              entry: [obs('a', first, 22), obs('b', second, 35)],
            },
          },
        }).trace.find((t) => t.ruleId === 'metformin-egfr-below-30');
      // The day-only value sorts at its day's first instant: 08:00Z that day is later.
      for (const [first, second] of [
        ['2021-03-01T08:00:00Z', '2021-02-01T08:00:00Z'],
        ['2021-03-01T08:00:00Z', '2021-03-01'],
        ['2021-03-01T08:00:00+01:00', '2021-02-28'],
      ] as const) {
        const trace = run(first, second);
        expect(trace?.status, `${first} & ${second}: ${trace?.error ?? ''}`).to.equal('fired');
      }
    });
  });

  describe('the 1.2.0 clinical review (spec/fixtures/packs/medication-safety)', () => {
    const compiled = compilePack(loadPack());
    const evaluate = (request: PackTestRequest, now = '2020-03-15T12:00:00Z') => {
      const service = compiled.pack.services.find((s) => s.hook === request.hook)!;
      return evaluateInline(compiled, service.id, {
        hook: request.hook,
        hookInstance: request.hookInstance ?? 'd1577c69-dfbe-44ad-ba6d-3e05e953b2ea',
        context: request.context,
        prefetch: request.prefetch ?? {},
        now: new Date(now),
      });
    };
    const summaryOf = (request: PackTestRequest, ruleId: string) =>
      evaluate(request).cards.find((c) => c.ruleId === ruleId)?.summary;
    const egfrFixtures = fs
      .readdirSync(REVIEW_DIR)
      .filter((f) => f.startsWith('egfr-') || f.startsWith('metformin-'))
      .map((f) => f.replace(/\.json$/, ''));

    it('fires the metformin eGFR cards exactly as a TypeScript oracle of RULES.md R4 says', () => {
      expect(egfrFixtures.length).to.be.greaterThan(15);
      for (const name of egfrFixtures) {
        const request = reviewRequest(name);
        const result = evaluate(request);
        const errors = result.trace.filter((t) => t.status !== 'fired' && t.status !== 'not-fired');
        expect(errors, name).to.deep.equal([]);
        const fired = result.trace.filter((t) => t.fired).map((t) => t.ruleId);
        const egfr = latestEgfrOracle(prefetchResources(request));
        const below30 =
          request.hook === 'order-sign'
            ? 'metformin-egfr-below-30'
            : 'metformin-active-egfr-below-30';
        const from30 =
          request.hook === 'order-sign' ? 'metformin-egfr-30-45' : 'metformin-low-egfr-review';
        expect(fired.includes(below30), `${name}: ${below30} (oracle ${egfr})`).to.equal(
          egfr !== undefined && egfr < 30,
        );
        expect(fired.includes(from30), `${name}: ${from30} (oracle ${egfr})`).to.equal(
          egfr !== undefined && egfr >= 30 && egfr < 45,
        );
      }
    });

    // 1.1.0: "latest eGFR is 30" for 29.95 on the "< 30" card; "latest eGFR is " (blank) for
    // a result dated by effectiveInstant; no card at all for "<15".
    const summaries: Array<[string, string, string]> = [
      [
        'egfr-29.95',
        'metformin-egfr-below-30',
        'Metformin is contraindicated: latest eGFR is 29.9 mL/min/{1.73_m2} on 2020-03-01',
      ],
      [
        'egfr-only-dated-by-instant',
        'metformin-egfr-below-30',
        'Metformin is contraindicated: latest eGFR is 20 mL/min/{1.73_m2} on 2020-03-01',
      ],
      [
        'egfr-latest-text-lt15',
        'metformin-egfr-below-30',
        'Metformin is contraindicated: latest eGFR is <15 on 2020-03-01',
      ],
      [
        'egfr-latest-below-30-quantity',
        'metformin-egfr-below-30',
        'Metformin is contraindicated: latest eGFR is <30 mL/min/{1.73_m2} on 2020-03-01',
      ],
      [
        'egfr-same-instant-pair-a',
        'metformin-egfr-below-30',
        'Metformin is contraindicated: latest eGFR is 28 mL/min/{1.73_m2} on 2020-03-01',
      ],
      [
        'egfr-mL-s-36',
        'metformin-egfr-30-45',
        'Starting metformin is not recommended: latest eGFR is 0.6 mL/s/{1.73_m2} on 2020-03-01',
      ],
      [
        'egfr-exactly-30',
        'metformin-egfr-30-45',
        'Starting metformin is not recommended: latest eGFR is 30 mL/min/{1.73_m2} on 2020-03-01',
      ],
    ];
    for (const [name, ruleId, summary] of summaries) {
      it(`shows the latest eGFR as reported, never blank or rounded across a threshold: ${name}`, () => {
        expect(summaryOf(reviewRequest(name), ruleId)).to.equal(summary);
      });
    }

    it('words the 30-45 metformin order card by whether metformin is already active', () => {
      expect(summaryOf(reviewRequest('metformin-new-egfr-40'), 'metformin-egfr-30-45')).to.equal(
        'Starting metformin is not recommended: latest eGFR is 40 mL/min/{1.73_m2} on 2020-03-01',
      );
      expect(summaryOf(reviewRequest('metformin-active-egfr-40'), 'metformin-egfr-30-45')).to.equal(
        'Reassess continuing metformin: latest eGFR is 40 mL/min/{1.73_m2} on 2020-03-01',
      );
    });

    it('suggests acetaminophen at a dose whose schedule stays under 2 g a day (PDDI IG: APAP < 2 g/day)', () => {
      const withId = evaluate(reviewRequest('ppi-cancelled'));
      const withoutId = evaluate(
        readJson(
          path.resolve(
            PACK_DIR,
            '../../../spec/fixtures/pddi-cds/requests/warfarin-nsaids-order-sign-no-coordination.json',
          ),
        ) as PackTestRequest,
      );
      const cards = [...withId.cards, ...withoutId.cards].filter((c) => c.suggestions);
      expect(cards.map((c) => c.ruleId).sort()).to.deep.equal([
        'warfarin-nsaid',
        'warfarin-nsaid-draft-without-id',
      ]);
      for (const card of cards) {
        for (const s of card.suggestions ?? []) {
          const create = s.actions?.find((a) => a.type === 'create');
          const dosage = create?.resource?.dosageInstruction as Array<{ text: string }>;
          const text = dosage[0]!.text;
          const m =
            /^(\d+) mg .* every (\d+) hours as needed, at most \d+ tablets? \(([\d,]+) mg\) in 24 hours: acetaminophen under 2 g per day/.exec(
              text,
            );
          expect(m, text).to.not.equal(null);
          const [dose, hours, max] = [
            Number(m![1]),
            Number(m![2]),
            Number(m![3]!.replace(',', '')),
          ];
          expect((dose * 24) / hours, text).to.be.at.most(max);
          expect(max, text).to.be.below(2000);
        }
      }
    });

    it('deletes the NSAID draft by its id, and offers no delete for a draft without one', () => {
      const withId = evaluate(reviewRequest('ppi-cancelled')).cards.find(
        (c) => c.ruleId === 'warfarin-nsaid',
      );
      const deletes = withId?.suggestions
        ?.flatMap((s) => s.actions ?? [])
        .filter((a) => a.type === 'delete');
      expect(deletes?.map((a) => a.resourceId)).to.deep.equal([
        'MedicationRequest/d-ibu',
        'MedicationRequest/d-ibu',
      ]);
      // The PDDI IG order-sign request's draft has no id (1.1.0: resourceId 'MedicationRequest/').
      const request = readJson(
        path.resolve(
          PACK_DIR,
          '../../../spec/fixtures/pddi-cds/requests/warfarin-nsaids-order-sign-no-coordination.json',
        ),
      ) as PackTestRequest;
      const cards = evaluate(request).cards;
      expect(cards.map((c) => c.ruleId)).to.not.include('warfarin-nsaid');
      const card = cards.find((c) => c.ruleId === 'warfarin-nsaid-draft-without-id');
      expect(card?.summary).to.equal(
        'Warfarin + Ketorolac Tromethamine 10 MG Oral Tablet: increased risk of bleeding',
      );
      const actions = card?.suggestions?.flatMap((s) => s.actions ?? []) ?? [];
      expect(actions.map((a) => a.type)).to.deep.equal(['create', 'create']);
    });

    it('reads a draft coded by a medicationReference to a contained Medication', () => {
      // 1.1.0: no card at all (only medicationCodeableConcept was read).
      for (const name of [
        'draft-contained-medication',
        'draft-contained-medication-order-select',
      ]) {
        const cards = evaluate(reviewRequest(name)).cards;
        expect(
          cards.map((c) => c.summary),
          name,
        ).to.include('Warfarin + Ibuprofen 200 MG Oral Tablet: increased risk of bleeding');
      }
    });

    it('reads prescriptions and orders naming their drug by a Medication (contained, prefetch, draft Bundle)', () => {
      // 1.2.0: no card (only medicationCodeableConcept was read for prescriptions in prefetch).
      for (const name of [
        'warfarin-contained-medication',
        'warfarin-medication-in-prefetch',
        'draft-medication-in-draft-bundle',
      ]) {
        const cards = evaluate(reviewRequest(name)).cards;
        expect(
          cards.map((c) => c.summary),
          name,
        ).to.include('Warfarin + Ibuprofen 200 MG Oral Tablet: increased risk of bleeding');
        expect(cards.map((c) => c.ruleId)).to.not.include('medication-not-identified');
      }
    });

    it('says so when a prescription names a Medication the request does not carry', () => {
      const cards = evaluate(reviewRequest('warfarin-medication-unresolved')).cards;
      expect(cards.map((c) => c.ruleId)).to.not.include('warfarin-nsaid');
      const card = cards.find((c) => c.ruleId === 'medication-not-identified');
      expect(card?.indicator).to.equal('info');
      expect(card?.summary).to.equal(
        'Drug not identified for 1 prescription(s) or order(s): interactions with it were not checked',
      );
      expect(card?.detail).to.include('Not identified: Warfarin 5 mg tablet.');
    });

    it('names both NSAID orders on warfarin, and each suggestion deletes both and orders acetaminophen once', () => {
      // 1.2.0: the card named ibuprofen only, and its suggestions deleted draft d-ibu only.
      const cards = evaluate(reviewRequest('warfarin-two-nsaid-drafts')).cards;
      expect(cards.map((c) => c.ruleId)).to.not.include('warfarin-nsaid');
      const card = cards.find((c) => c.ruleId === 'warfarin-nsaid-two-orders');
      expect(card?.summary).to.equal(
        'Warfarin + Ibuprofen 200 MG Oral Tablet and Naproxen sodium 220 MG Oral Tablet: increased risk of bleeding',
      );
      expect(card?.suggestions).to.have.length(2);
      for (const s of card?.suggestions ?? []) {
        const actions = s.actions ?? [];
        expect(actions.filter((a) => a.type === 'delete').map((a) => a.resourceId)).to.deep.equal([
          'MedicationRequest/d-ibu',
          'MedicationRequest/d-nap',
        ]);
        expect(actions.filter((a) => a.type === 'create')).to.have.length(1);
      }
      // Three NSAID orders: no delete actions (a suggestion's actions are fixed), said in the detail.
      const three = evaluate(reviewRequest('warfarin-three-nsaid-drafts')).cards.find(
        (c) => c.ruleId === 'warfarin-nsaid-draft-without-id',
      );
      expect(three?.summary).to.equal('Warfarin + 3 NSAID orders: increased risk of bleeding');
      expect(three?.detail).to.include('cannot all be removed by a suggestion');
      expect(three?.suggestions?.flatMap((s) => s.actions ?? []).map((a) => a.type)).to.deep.equal([
        'create',
        'create',
      ]);
    });

    const noRecent: Array<[string, string]> = [
      ['egfr-none', 'No recent eGFR: renal dosing could not be checked'],
      ['egfr-none-nsaid', 'No recent eGFR: renal dosing could not be checked'],
      [
        'egfr-only-older-than-12-months',
        'No eGFR in the last 12 months (latest 2018-11-02): check renal function',
      ],
      [
        'egfr-latest-unreadable',
        'No eGFR in the last 12 months (latest 2019-01-10): check renal function',
      ],
    ];
    for (const [name, summary] of noRecent) {
      it(`says when no readable eGFR of the last 12 months was there to check: ${name}`, () => {
        const card = evaluate(reviewRequest(name)).cards.find(
          (c) => c.ruleId === 'renal-dosing-no-recent-egfr',
        );
        expect(card?.indicator).to.equal('info');
        expect(card?.summary).to.equal(summary);
      });
    }

    it('names a later eGFR result it could not read on the card that used an older one', () => {
      const card = evaluate(reviewRequest('egfr-latest-unreadable')).cards.find(
        (c) => c.ruleId === 'metformin-egfr-below-30',
      );
      expect(card?.summary).to.equal(
        'Metformin is contraindicated: latest eGFR is 20 mL/min/{1.73_m2} on 2019-01-10',
      );
      expect(card?.detail).to.include(
        'A later eGFR result (2020-03-01) could not be read: its value or unit is not recognised.',
      );
    });

    const unitSpellings: Array<[string, string]> = [
      [
        'egfr-unit-space-no-code',
        'Metformin is contraindicated: latest eGFR is 20 mL/min/1.73 m2 on 2020-03-01',
      ],
      [
        'egfr-unit-caret',
        'Metformin is contraindicated: latest eGFR is 20 mL/min/1.73m^2 on 2020-03-01',
      ],
      ['egfr-text-decimal', 'Metformin is contraindicated: latest eGFR is 29.5 on 2020-03-01'],
    ];
    for (const [name, summary] of unitSpellings) {
      it(`reads the eGFR and the metformin order of ${name}`, () => {
        expect(summaryOf(reviewRequest(name), 'metformin-egfr-below-30')).to.equal(summary);
      });
    }

    // PDDI IG DigoxinCyclosporineCDSLogic "Get Card 2 Indicator" (1.1.0: one info card, on the
    // existence of any level).
    const digoxinCards: Array<[string, string, string]> = [
      [
        'digoxin-new-cyclosporine-no-level',
        'digoxin-cyclosporine-no-level-new-cyclosporine',
        'critical',
      ],
      [
        'digoxin-new-cyclosporine-level-2.4',
        'digoxin-cyclosporine-no-level-new-cyclosporine',
        'critical',
      ],
      [
        'digoxin-new-cyclosporine-normal-then-high',
        'digoxin-cyclosporine-no-level-new-cyclosporine',
        'critical',
      ],
      [
        'digoxin-new-cyclosporine-level-0.7',
        'digoxin-cyclosporine-normal-level-new-cyclosporine',
        'warning',
      ],
      ['digoxin-ordered-on-cyclosporine-no-level', 'digoxin-cyclosporine-no-level', 'warning'],
    ];
    for (const [name, ruleId, indicator] of digoxinCards) {
      it(`gives the digoxin level card of the PDDI IG: ${name} -> ${ruleId} (${indicator})`, () => {
        const cards = evaluate(reviewRequest(name), '2020-04-01T12:00:00Z').cards;
        const levelCards = cards.filter((c) => c.ruleId !== 'digoxin-cyclosporine');
        expect(levelCards.map((c) => [c.ruleId, c.indicator])).to.deep.equal([[ruleId, indicator]]);
      });
    }

    // AgeInYears() > 65 (PDDI IG): whole years, so the card starts on the 66th birthday.
    const ages: Array<[string, boolean]> = [
      ['1955-03-15', false], // 65 today
      ['1955-01-10', false], // 65 and 2 months
      ['1954-03-16', false], // 65 and 364 days
      ['1954-03-15', true], // 66 today
      ['1940-01-01', true],
    ];
    for (const [birthDate, fires] of ages) {
      it(`gives the age card on 2020-03-15 to a patient born ${birthDate}: ${fires}`, () => {
        const request = structuredClone(reviewRequest('age-exactly-65'));
        (request.prefetch!.patient as Json).birthDate = birthDate;
        const fired = evaluate(request)
          .trace.filter((t) => t.fired)
          .map((t) => t.ruleId);
        expect(fired).to.include('warfarin-nsaid');
        expect(fired.includes('warfarin-nsaid-gi-bleed-risk')).to.equal(fires);
      });
    }
  });
});
