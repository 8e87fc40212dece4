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
    for (const p of syntheaManifest()) {
      const record = readPatientBundle(readJson(path.join(SYNTHEA_DIR, p.file)));
      const now = new Date(`${p.last_encounter}T23:59:59Z`);
      for (const service of pack.services) {
        const draftSets = service.hook === 'patient-view' ? [[]] : DRAFTS.map((d) => [d]);
        for (const draftOrders of draftSets) {
          const request = buildRequestFromRecord({ service, record, draftOrders });
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
              `${p.file} ${service.id} ${JSON.stringify(draftOrders.map((d) => (d.medicationCodeableConcept as { text: string }).text))}: engine ${JSON.stringify(actualSet)} errors ${JSON.stringify(errors)} vs fhirpath.js ${JSON.stringify(expected)}`,
            );
          }
        }
      }
    }
    expect(mismatches, mismatches.slice(0, 5).join('\n')).to.deep.equal([]);
    // The comparison is not vacuous: many rules fired across the corpus.
    expect(compared).to.equal(53 * (1 + 2 * DRAFTS.length));
    expect(firedTotal).to.be.greaterThan(40);
  });
});
