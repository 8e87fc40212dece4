import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  compilePack,
  createEvaluator,
  PackValidationError,
  parsePackText,
  resolvePackFiles,
  runPackTests,
} from '../../rules/index.ts';
import type { Evaluator, RulePack } from '../../rules/index.ts';

const PACKS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/packs');
const MAFALDA_ID = '11a7f0e3-b1d0-431c-adb6-ad1ad8d61720';

function fullPack(): RulePack {
  return parsePackText(fs.readFileSync(path.join(PACKS, 'full-pack.yaml'), 'utf8')) as RulePack;
}

describe('rules: embedded pack tests', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(() => {
    evaluator = createEvaluator({ workers: 1 });
  });
  after(async () => {
    await evaluator.close();
  });

  describe('resolvePackFiles', () => {
    it('turns a request file into an inline request (without fhirServer)', () => {
      const raw = fullPack();
      const before = JSON.stringify(raw);
      const resolved = resolvePackFiles(raw, PACKS) as RulePack;
      expect(JSON.stringify(raw)).to.equal(before);
      const t = resolved.tests![2]!;
      expect(t).to.not.have.property('requestFile');
      expect(t.request).to.have.keys('hook', 'hookInstance', 'context', 'prefetch');
      expect(t.request!.hook).to.equal('order-sign');
      expect(t.request!.context.patientId).to.equal('p2');
    });

    it('builds a request from a Synthea bundle with the service prefetch and the draft orders', () => {
      const resolved = resolvePackFiles(fullPack(), PACKS) as RulePack;
      const view = resolved.tests![3]!;
      expect(view).to.not.have.any.keys('patientBundle', 'draftOrders');
      expect(view.request!.hook).to.equal('patient-view');
      expect(view.request!.context.patientId).to.equal(MAFALDA_ID);
      expect(view.request!.prefetch).to.have.keys('patient', 'meds');
      const sign = resolved.tests![4]!;
      const drafts = sign.request!.context.draftOrders as {
        entry: Array<{ resource: Record<string, unknown> }>;
      };
      expect(drafts.entry).to.have.length(1);
      expect(drafts.entry[0]!.resource.medicationCodeableConcept).to.deep.equal({
        coding: [
          {
            system: 'http://www.nlm.nih.gov/research/umls/rxnorm',
            code: '197806',
            display: 'Ibuprofen 600 MG Oral Tablet',
          },
        ],
      });
    });

    it('leaves inline tests and non-pack input alone', () => {
      const resolved = resolvePackFiles(fullPack(), PACKS) as RulePack;
      expect(resolved.tests![0]).to.deep.equal(fullPack().tests![0]);
      const pd = { resourceType: 'PlanDefinition', id: 'x' };
      expect(resolvePackFiles(pd, PACKS)).to.equal(pd);
      expect(resolvePackFiles('text', PACKS)).to.equal('text');
    });

    it('names every test whose file cannot be used', () => {
      const raw = fullPack();
      raw.tests![2]!.requestFile = 'requests/nope.json';
      raw.tests![3]!.patientBundle = 'full-pack.yaml';
      try {
        resolvePackFiles(raw, PACKS);
        expect.fail('expected a PackValidationError');
      } catch (err) {
        expect(err).to.be.instanceOf(PackValidationError);
        expect((err as PackValidationError).problems).to.deep.equal([
          {
            path: 'tests[2].requestFile',
            message: `cannot use requests/nope.json: file not found (looked for ${path.join(PACKS, 'requests/nope.json')}; paths are relative to the pack file's folder)`,
          },
          { path: 'tests[3].patientBundle', message: 'cannot use full-pack.yaml: not valid JSON' },
        ]);
      }
    });
  });

  describe('runPackTests', () => {
    it('runs every test of the full pack and reports pass, trace and cards', async () => {
      const compiled = compilePack(resolvePackFiles(fullPack(), PACKS) as RulePack);
      const results = await runPackTests(compiled, evaluator);
      expect(results.map((r) => [r.name, r.passed, r.failures])).to.deep.equal(
        compiled.pack.tests!.map((t) => [t.name, true, []]),
      );
      const mafalda = results[3]!;
      expect(mafalda.trace.map((t) => [t.ruleId, t.status])).to.deep.equal([
        ['warfarin-nsaid-active', 'fired'],
        ['elderly-on-warfarin', 'not-fired'],
      ]);
      expect(mafalda.cards[0]?.summary).to.equal(
        'Warfarin with Naproxen sodium 220 MG Oral Tablet: bleeding risk',
      );
      expect(mafalda.cards[0]?.suggestions?.[0]?.actions?.[0]?.resourceId).to.equal(
        'MedicationRequest/7afca009-2f35-475f-9d07-b2c5223c304b',
      );
    });

    it('pins %now to the test instant', async () => {
      const pack = fullPack();
      pack.tests = [{ ...pack.tests![0]!, now: '2001-01-01T00:00:00Z' }];
      // Born 1950-06-01: 50 on 2001-01-01, so the "65 or over" rule does not fire then.
      const results = await runPackTests(compilePack(pack), evaluator);
      expect(results[0]!.passed).to.equal(false);
      expect(results[0]!.failures).to.deep.equal(['expected rule elderly-on-warfarin to fire']);
    });

    it('fails a test that is still file-based', async () => {
      const results = await runPackTests(compilePack(fullPack()), evaluator);
      expect(results[2]).to.deep.include({
        passed: false,
        failures: ['resolve test files before running (requestFile / patientBundle)'],
      });
    });
  });
});
