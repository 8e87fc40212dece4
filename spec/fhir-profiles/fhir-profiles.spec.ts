import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  isR4ResourceType,
  rulePackPlanDefinitionProfile,
  RULE_PACK_PLANDEFINITION_PROFILE,
  validateFhirResource,
  validateRulePackPlanDefinition,
} from '../../fhir-profiles/index.ts';

type Json = Record<string, unknown>;

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const FIXTURES = path.join(ROOT, 'spec/fixtures');

function readJson(file: string): Json {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as Json;
}

function example(): Json {
  return readJson(path.join(ROOT, 'rules/packs/plandefinition-example/plandefinition.json'));
}

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
const draft: Json = {
  resourceType: 'MedicationRequest',
  status: 'draft',
  intent: 'order',
  subject: { reference: 'Patient/p1' },
  medicationCodeableConcept: { coding: [{ system: RXNORM, code: '313782' }] },
};

describe('fhir-profiles', () => {
  describe('isR4ResourceType', () => {
    it('knows the R4 resource types and nothing else', () => {
      for (const t of [
        'Patient',
        'MedicationRequest',
        'PlanDefinition',
        'Bundle',
        'VisionPrescription',
      ]) {
        expect(isR4ResourceType(t), t).to.equal(true);
      }
      for (const t of [
        'patient',
        'Observaton',
        'Resource',
        'DomainResource',
        'MedicationOrder',
        '',
        'constructor',
        '__proto__',
      ]) {
        expect(isR4ResourceType(t), t).to.equal(false);
      }
    });
  });

  describe('validateFhirResource (base R4, @medplum/core)', () => {
    it('accepts a valid MedicationRequest', () => {
      expect(validateFhirResource(draft)).to.deep.equal([]);
    });

    it('accepts every resource of a Synthea patient', () => {
      const bundle = readJson(
        path.join(FIXTURES, 'synthea-r4/Derek_Becker_3c7d3369-55b5-420b-83d3-c5dda319b9c9.json'),
      );
      const entries = bundle.entry as Array<{ resource: Json }>;
      for (const { resource } of entries) {
        expect(validateFhirResource(resource), String(resource.resourceType)).to.deep.equal([]);
      }
    });

    const bad: Array<[string, unknown, string, RegExp]> = [
      [
        'a missing required field',
        { ...draft, intent: undefined },
        'intent',
        /Missing required property/,
      ],
      [
        'an unknown property',
        { ...draft, colour: 'red' },
        'colour',
        /Invalid additional property "colour"/,
      ],
      ['a wrong JSON type', { ...draft, status: 7 }, 'status', /expected string/],
      [
        'a malformed date',
        { ...draft, authoredOn: '2020-13-45' },
        'authoredOn',
        /Invalid dateTime format/,
      ],
      [
        'a nested error',
        { ...draft, medicationCodeableConcept: { coding: [{ system: RXNORM, code: 5 }] } },
        'medicationCodeableConcept.coding[0].code',
        /expected string/,
      ],
      ['an unknown resource type', { resourceType: 'Nonsense' }, '', /Unknown data type/],
      ['a value without resourceType', { id: 'x' }, 'resourceType', /not a FHIR resource/],
      ['null', null, 'resourceType', /not a FHIR resource/],
    ];
    for (const [name, resource, problemPath, message] of bad) {
      it(`reports ${name} with its path`, () => {
        const problems = validateFhirResource(resource);
        const hit = problems.find((p) => p.path === problemPath);
        expect(hit, JSON.stringify(problems)).not.to.equal(undefined);
        expect(hit!.message).to.match(message);
      });
    }

    it('never echoes values in its messages', () => {
      const secret = 'Jane-Doe-SSN-123-45-6789';
      const problems = validateFhirResource({
        resourceType: 'Patient',
        birthDate: secret,
        gender: 42,
        name: [{ family: 7, text: secret }],
        [secret]: true,
      });
      expect(problems.length).to.be.greaterThan(0);
      for (const p of problems) {
        // A property *name* may be named; a property value never is.
        expect(p.message.replace(`"${secret}"`, '')).not.to.contain(secret.slice(0, 8));
      }
    });
  });

  describe('the rule-pack PlanDefinition profile', () => {
    it('is a valid R4 StructureDefinition constraining PlanDefinition', () => {
      const sd = readJson(
        path.join(ROOT, 'fhir-profiles/StructureDefinition-cellcds-rule-pack-plandefinition.json'),
      );
      expect(validateFhirResource(sd)).to.deep.equal([]);
      expect(sd.url).to.equal(RULE_PACK_PLANDEFINITION_PROFILE);
      expect(sd.type).to.equal('PlanDefinition');
      expect(sd.derivation).to.equal('constraint');
      expect(rulePackPlanDefinitionProfile().url).to.equal(RULE_PACK_PLANDEFINITION_PROFILE);
    });

    it('and its extension definitions are valid StructureDefinitions too', () => {
      for (const file of [
        'StructureDefinition-cds-service.json',
        'StructureDefinition-override-reason.json',
      ]) {
        expect(
          validateFhirResource(readJson(path.join(ROOT, 'fhir-profiles', file))),
          file,
        ).to.deep.equal([]);
      }
    });

    it('constrains only paths that exist in R4 PlanDefinition', () => {
      const known = new Set([
        'PlanDefinition',
        'version',
        'publisher',
        'description',
        'type',
        'action',
      ]);
      const actionChildren = new Set([
        'id',
        'title',
        'priority',
        'trigger',
        'condition',
        'dynamicValue',
        'action',
        'type',
        'description',
      ]);
      for (const element of rulePackPlanDefinitionProfile().differential.element) {
        const [root, first, ...rest] = element.path.split('.');
        expect(root).to.equal('PlanDefinition');
        if (first !== undefined) {
          expect(known.has(first), element.path).to.equal(true);
        }
        // action(.action)*.<child>(.<datatype child>)
        const actionSteps = rest.filter((s) => s === 'action').length;
        const tail = rest.slice(actionSteps);
        if (first === 'action' && tail.length > 0) {
          expect(actionChildren.has(tail[0]!), element.path).to.equal(true);
        }
      }
    });

    it('accepts the example PlanDefinition pack', () => {
      expect(validateRulePackPlanDefinition(example())).to.deep.equal([]);
    });

    it('applies top-level constraints to top-level actions only', () => {
      // Nested actions (suggestions) have no trigger, condition or priority: that is valid.
      const pd = example();
      const nested = ((pd.action as Json[])[0]!.action as Json[])[0]!;
      expect(nested).not.to.have.property('trigger');
      expect(validateRulePackPlanDefinition(pd)).to.deep.equal([]);
    });

    const cases: Array<[string, (pd: Json, a: Json[]) => void, string, RegExp]> = [
      ['a missing version', (pd) => delete pd.version, 'version', /min 1/],
      ['a missing publisher', (pd) => delete pd.publisher, 'publisher', /min 1/],
      ['a missing type', (pd) => delete pd.type, 'type', /min 1/],
      ['no actions', (pd) => delete pd.action, 'action', /min 1/],
      [
        'two triggers on one rule',
        (_, a) => (a[0]!.trigger as Json[]).push({ type: 'named-event', name: 'order-select' }),
        'action[0].trigger',
        /at most 1/,
      ],
      [
        'a condition without an expression',
        (_, a) => delete (a[0]!.condition as Json[])[0]!.expression,
        'action[0].condition[0].expression',
        /min 1/,
      ],
      [
        'a suggestion without a title',
        (_, a) => delete (a[0]!.action as Json[])[0]!.title,
        'action[0].action[0].title',
        /min 1/,
      ],
      [
        'a suggestion action without a description',
        (_, a) => delete ((a[0]!.action as Json[])[0]!.action as Json[])[0]!.description,
        'action[0].action[0].action[0].description',
        /min 1/,
      ],
      [
        'actions nested four deep',
        (_, a) =>
          (((a[0]!.action as Json[])[0]!.action as Json[])[0]!.action = [{ title: 'too deep' }]),
        'action[0].action[0].action[0].action',
        /three levels/,
      ],
      [
        'a dynamicValue in CQL',
        (_, a) =>
          ((
            ((a[0]!.action as Json[])[0]!.action as Json[])[0]!.dynamicValue as Json[]
          )[0]!.expression = { language: 'text/cql', expression: 'x' }),
        'action[0].action[0].action[0].dynamicValue[0].expression.language',
        /text\/fhirpath/,
      ],
      ['a base R4 error (status code)', (pd) => (pd.status = 5), 'status', /expected string/],
      [
        'a non-PlanDefinition',
        (pd) => (pd.resourceType = 'ActivityDefinition'),
        'resourceType',
        /must be PlanDefinition/,
      ],
    ];
    for (const [name, change, problemPath, message] of cases) {
      it(`reports ${name} at ${problemPath}`, () => {
        const pd = example();
        change(pd, pd.action as Json[]);
        const problems = validateRulePackPlanDefinition(pd);
        const hit = problems.find((p) => p.path === problemPath);
        expect(hit, JSON.stringify(problems)).not.to.equal(undefined);
        expect(hit!.message).to.match(message);
      });
    }

    it('reports each problem once', () => {
      const pd = example();
      delete pd.version;
      const problems = validateRulePackPlanDefinition(pd);
      const keys = problems.map((p) => `${p.path}|${p.message}`);
      expect(new Set(keys).size).to.equal(keys.length);
    });
  });
});
