/**
 * Differential spec (issue 3): the cellcds engine agrees with direct fhirpath.js evaluation
 * on every rule of the shipped pack, for every Synthea patient, on every hook — with several
 * draft orders for order-sign / order-select. The reference environment is built
 * independently of the engine (spec/rules/pack-expressions.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import YAML from 'yaml';
import {
  buildRequestFromRecord,
  compilePack,
  createEvaluator,
  readPatientBundle,
} from '../../rules/index.ts';
import type { Evaluator, RulePack } from '../../rules/index.ts';
import { readJson, SYNTHEA_DIR, syntheaManifest } from './content-fixtures.ts';
import { PackExpressions } from './pack-expressions.ts';

const PACK_FILE = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../rules/packs/medication-safety/pack.yaml',
);
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

function draft(code: string, display: string): Record<string, unknown> {
  return {
    resourceType: 'MedicationRequest',
    status: 'draft',
    intent: 'order',
    medicationCodeableConcept: { coding: [{ system: RXNORM, code, display }], text: display },
  };
}

/** Drafts that exercise every order rule family: NSAID, metformin, cyclosporine, opioid. */
const DRAFTS = [
  draft('310965', 'Ibuprofen 200 MG Oral Tablet'),
  draft('860975', '24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet'),
  draft('315749', 'cyclosporine 25 MG Oral Capsule'),
  draft('1049221', 'Acetaminophen 325 MG / Oxycodone Hydrochloride 5 MG Oral Tablet'),
];

/** Every call the specs make: each Synthea patient, each service, each draft set. */
function* corpusCalls(pack: RulePack) {
  for (const p of syntheaManifest()) {
    const record = readPatientBundle(readJson(path.join(SYNTHEA_DIR, p.file)));
    const now = new Date(`${p.last_encounter}T23:59:59Z`);
    for (const service of pack.services) {
      const draftSets = service.hook === 'patient-view' ? [[]] : DRAFTS.map((d) => [d]);
      for (const draftOrders of draftSets) {
        const request = buildRequestFromRecord({ service, record, draftOrders });
        yield { file: p.file, service, draftOrders, request, now };
      }
    }
  }
}

describe('differential: engine vs fhirpath.js on the shipped pack over all Synthea patients', function () {
  this.timeout(180_000);
  const pack = YAML.parse(fs.readFileSync(PACK_FILE, 'utf8')) as RulePack;
  const compiled = compilePack(pack);
  const reference = new PackExpressions(pack);
  let evaluator: Evaluator;

  before(async () => {
    evaluator = createEvaluator();
    await evaluator.ready();
  });
  after(async () => evaluator.close());

  it('fires exactly the same rules on every patient, hook and draft', async () => {
    let compared = 0;
    let firedTotal = 0;
    const mismatches: string[] = [];
    for (const { file, service, draftOrders, request, now } of corpusCalls(pack)) {
      const expected = reference
        .fired(service.id, request, reference.variables(request, now))
        .sort();
      const result = await evaluator.evaluate(compiled, service.id, {
        hook: service.hook,
        hookInstance: crypto.randomUUID(),
        context: request.context,
        prefetch: request.prefetch ?? {},
        now,
      });
      const errors = result.trace.filter((t) => t.status === 'error' || t.status === 'timeout');
      const actual = result.cards.map((c) => c.ruleId);
      const actualSet = [...new Set(actual)].sort();
      compared++;
      firedTotal += expected.length;
      if (errors.length > 0 || JSON.stringify(actualSet) !== JSON.stringify(expected)) {
        mismatches.push(
          `${file} ${service.id} ${JSON.stringify(draftOrders.map((d) => (d.medicationCodeableConcept as { text: string }).text))}: engine ${JSON.stringify(actualSet)} errors ${JSON.stringify(errors)} vs fhirpath.js ${JSON.stringify(expected)}`,
        );
      }
    }
    expect(mismatches, mismatches.slice(0, 5).join('\n')).to.deep.equal([]);
    // The comparison is not vacuous: many rules fired across the corpus.
    expect(compared).to.equal(53 * (1 + 2 * DRAFTS.length));
    expect(firedTotal).to.be.greaterThan(40);
  });

  it('in the calling thread (inlineSliceMs): the same results as the workers, input untouched', async () => {
    // A generous slice so that a slow machine does not hand calls off: here every call of the
    // shipped pack must finish in the calling thread.
    const inline = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
    const strip = (r: {
      trace: Array<{ durationMs: number }>;
      lets?: Array<{ durationMs: number }>;
    }) =>
      JSON.stringify({
        ...r,
        durationMs: 0,
        trace: r.trace.map((t) => ({ ...t, durationMs: 0 })),
        lets: r.lets?.map((l) => ({ ...l, durationMs: 0 })),
      });
    try {
      // The pack's first call goes to a worker while this thread compiles it in slices
      // (rules/evaluator.ts, compileAside): on a loaded machine that compile can outlast the
      // spec's first calls. Compile it here first; from then on every call must stay inline.
      const [first] = corpusCalls(pack);
      if (first) {
        for (let i = 0; i < 200 && (inline.stats().inline ?? 0) === 0; i++) {
          await inline.evaluate(compiled, first.service.id, {
            hook: first.service.hook,
            hookInstance: crypto.randomUUID(),
            context: first.request.context,
            prefetch: first.request.prefetch ?? {},
            now: first.now,
          });
          await new Promise((resolve) => setTimeout(resolve, 25));
        }
      }
      const base = inline.stats();
      let calls = 0;
      const differences: string[] = [];
      for (const { file, service, request, now } of corpusCalls(pack)) {
        const input = {
          hook: service.hook,
          hookInstance: crypto.randomUUID(),
          context: request.context,
          prefetch: request.prefetch ?? {},
          now,
        };
        const before = JSON.stringify(input);
        const here = await inline.evaluate(compiled, service.id, input);
        const there = await evaluator.evaluate(compiled, service.id, input);
        calls++;
        if (JSON.stringify(input) !== before) {
          differences.push(`${file} ${service.id}: the input changed`);
        }
        if (strip(here) !== strip(there)) {
          differences.push(`${file} ${service.id}: ${strip(here)} vs ${strip(there)}`);
        }
      }
      expect(differences, differences.slice(0, 3).join('\n')).to.deep.equal([]);
      const stats = inline.stats();
      expect((stats.inline ?? 0) - (base.inline ?? 0)).to.equal(calls);
      expect((stats.handedOff ?? 0) - (base.handedOff ?? 0)).to.equal(0);
    } finally {
      await inline.close();
    }
  });
});
