import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  buildRequestFromRecord,
  createEvaluator,
  isPlanDefinition,
  PackValidationError,
  planDefinitionToPack,
  readPatientBundle,
  validatePack,
} from '../../rules/index.ts';
import type { PackProblem, RulePack } from '../../rules/index.ts';
import { FIXTURES, readJson, syntheaBundle, syntheaPatient } from './content-fixtures.ts';
import { PackExpressions } from './pack-expressions.ts';
import type { Json } from './pack-expressions.ts';

const EXAMPLE = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../rules/packs/plandefinition-example/plandefinition.json',
);

function example(): Json {
  return JSON.parse(fs.readFileSync(EXAMPLE, 'utf8')) as Json;
}

/** A mutated copy of the example. `a` = the top-level actions, `x` = the root extensions. */
function mutate(change: (pd: Json, a: Json[], x: Json[]) => void): Json {
  const pd = example();
  change(pd, pd.action as Json[], pd.extension as Json[]);
  return pd;
}

function problemsOf(resource: unknown): PackProblem[] {
  try {
    planDefinitionToPack(resource);
  } catch (err) {
    if (err instanceof PackValidationError) {
      return err.problems;
    }
    throw err;
  }
  return [];
}

describe('rules/plan-definition', () => {
  it('recognises a PlanDefinition and nothing else', () => {
    expect(isPlanDefinition(example())).to.equal(true);
    for (const other of [null, [], 'PlanDefinition', { resourceType: 'Bundle' }, { id: 'pack' }]) {
      expect(isPlanDefinition(other), JSON.stringify(other)).to.equal(false);
    }
  });

  describe('the example pack', () => {
    let pack: RulePack;
    before(() => {
      pack = planDefinitionToPack(example());
    });

    it('maps the metadata, the identifier to the pack id, and one service per hook', () => {
      expect(pack.id).to.equal('plandefinition-example');
      expect(pack.version).to.equal('1.0.1');
      expect(pack.title).to.equal('Example pack authored as a PlanDefinition');
      expect(pack.publisher).to.equal('cellcds clinical content');
      expect(pack.effectivePeriod).to.deep.equal({ start: '2025-01-01' });
      expect(pack.services.map((s) => [s.id, s.hook])).to.deep.equal([
        ['plandefinition-example-order-sign', 'order-sign'],
        // No id in its cds-service extension: <pack-id>-<hook>.
        ['plandefinition-example-patient-view', 'patient-view'],
      ]);
      expect(pack.services[1]!.prefetch).to.deep.equal({
        medications: 'MedicationRequest?patient={{context.patientId}}&status=active',
        labs: 'Observation?patient={{context.patientId}}&code=http://loinc.org|33914-3,http://loinc.org|62238-1,http://loinc.org|98979-8',
      });
      expect(Object.keys(pack.let ?? {})).to.deep.equal(['nsaidDraft', 'latestEgfr']);
      expect(Object.keys(pack.valueSets ?? {})).to.deep.equal([
        'warfarin',
        'nsaids',
        'metformin',
        'egfr',
      ]);
      expect(pack.valueSets!.egfr!.codes).to.deep.equal([
        { system: 'http://loinc.org', code: '33914-3' },
        { system: 'http://loinc.org', code: '62238-1' },
        { system: 'http://loinc.org', code: '98979-8' },
      ]);
    });

    it('maps actions to rules: conditions AND-ed, priority to indicator, documentation to source and links', () => {
      const [warfarin, metformin] = pack.rules;
      expect(warfarin!.id).to.equal('warfarin-nsaid');
      expect(warfarin!.service).to.equal('plandefinition-example-order-sign');
      expect(warfarin!.when).to.match(/^\(%nsaidDraft\.exists\(\)\) and \(%prefetch\.medications/);
      expect(warfarin!.card.indicator).to.equal('warning');
      expect(warfarin!.card.source).to.deep.equal({
        label: 'HL7 Potential Drug-Drug Interaction (PDDI) CDS IG - warfarin + NSAIDs',
        url: 'https://build.fhir.org/ig/HL7/PDDI-CDS/',
      });
      expect(warfarin!.card.links).to.deep.equal([
        {
          label: 'W3C minimal information model for PDDI evidence',
          url: 'https://www.w3.org/2019/05/pddi/index.html',
          type: 'absolute',
        },
      ]);
      expect(metformin!.card.indicator).to.equal('critical');
      expect(metformin!.card.overrideReasons).to.deep.equal([
        {
          system: 'http://cellcds.dev/fhir/CodeSystem/override-reason',
          code: 'benefit-outweighs-risk',
          display: 'Benefit outweighs the risk for this patient',
        },
      ]);
    });

    it('maps nested actions to a suggestion with delete and create actions (dynamicValue)', () => {
      const card = pack.rules[0]!.card;
      expect(card.selectionBehavior).to.equal('at-most-one');
      const [suggestion] = card.suggestions ?? [];
      expect(suggestion!.label).to.equal('Replace the NSAID with acetaminophen 325 mg tablets');
      expect(suggestion!.isRecommended).to.equal(true);
      const [remove, create] = suggestion!.actions ?? [];
      expect(remove).to.deep.equal({
        type: 'delete',
        description: 'Remove the NSAID order',
        resourceId: "{{ 'MedicationRequest/' + %nsaidDraft.id }}",
      });
      expect(create!.type).to.equal('create');
      expect(create!.resource).not.to.have.property('id');
      expect(create!.resource!.subject).to.deep.equal({
        reference: "{{ 'Patient/' + %context.patientId }}",
      });
      expect(create!.resource!.resourceType).to.equal('MedicationRequest');
      // The same dose as the shipped medication-safety pack's 325 mg suggestion: under 2 g a day
      // while on warfarin (the card's own advice); it once said 650 mg every 6 hours (2.6 g).
      expect(create!.resource!.dosageInstruction).to.deep.equal([
        {
          text:
            '650 mg (2 tablets) by mouth every 8 hours as needed, at most 6 tablets (1,950 mg) ' +
            'in 24 hours: acetaminophen under 2 g per day while taking warfarin',
        },
      ]);
    });

    it('fires on Synthea patients as its rules say (fhirpath.js directly)', () => {
      const exprs = new PackExpressions(pack);
      const [orderSign, patientView] = pack.services;
      const run = (name: string, service: typeof orderSign, drafts?: Json[]) => {
        const record = readPatientBundle(syntheaBundle(name));
        const request = buildRequestFromRecord(
          drafts
            ? { service: service!, record, draftOrders: drafts }
            : { service: service!, record },
        );
        const now = new Date(`${syntheaPatient(name).last_encounter}T23:59:59Z`);
        return exprs.fired(service!.id, request, exprs.variables(request, now));
      };
      const ibuprofen = {
        resourceType: 'MedicationRequest',
        status: 'draft',
        intent: 'order',
        medicationCodeableConcept: {
          coding: [{ system: 'http://www.nlm.nih.gov/research/umls/rxnorm', code: '310965' }],
        },
      };
      expect(run('Derek_Becker', orderSign, [ibuprofen])).to.deep.equal(['warfarin-nsaid']);
      expect(run('Zachary_Kutch', orderSign, [ibuprofen])).to.deep.equal([]);
      expect(run('Coleman_Ortiz', patientView)).to.deep.equal(['metformin-egfr-below-30']);
      expect(run('Clarine_OKeefe', patientView)).to.deep.equal([]);
    });

    it('is accepted by validatePack as a pack', async () => {
      const evaluator = createEvaluator({ callBudgetMs: 30000, ruleBudgetMs: 10000 });
      try {
        const compiled = await validatePack(example(), { evaluator });
        expect(compiled.id).to.equal('plandefinition-example');
        expect(compiled.pack.rules).to.have.length(2);
      } finally {
        await evaluator.close();
      }
    });
  });

  describe('rejects', () => {
    const bad: Array<[string, Json, string, RegExp]> = [
      [
        'a CQL condition',
        mutate((_, a) => {
          (a[0]!.condition as Json[])[0]!.expression = {
            language: 'text/cql-identifier',
            expression: 'Inclusion Criteria',
          };
        }),
        'action[0].condition[0].expression.language',
        /must be "text\/fhirpath"/,
      ],
      [
        'a type other than eca-rule',
        mutate((pd) => {
          pd.type = { coding: [{ code: 'order-set' }] };
        }),
        'type',
        /eca-rule/,
      ],
      [
        'a top-level action without a trigger',
        mutate((_, a) => {
          delete a[1]!.trigger;
        }),
        'action[1].trigger',
        /required by the rule-pack profile/,
      ],
      [
        'a trigger that is not a named event',
        mutate((_, a) => {
          a[0]!.trigger = [{ type: 'data-added', name: 'order-sign' }];
        }),
        'action[0].trigger[0].type',
        /named-event/,
      ],
      [
        'an unsupported hook',
        mutate((_, a) => {
          a[0]!.trigger = [{ type: 'named-event', name: 'encounter-start' }];
        }),
        'action[0].trigger[0].name',
        /unsupported hook 'encounter-start'/,
      ],
      [
        'a condition of kind start',
        mutate((_, a) => {
          (a[0]!.condition as Json[])[1]!.kind = 'start';
        }),
        'action[0].condition[1].kind',
        /applicability/,
      ],
      [
        'a suggestion with its own trigger',
        mutate((_, a) => {
          (a[0]!.action as Json[])[0]!.trigger = [{ type: 'named-event', name: 'order-sign' }];
        }),
        'action[0].action[0].trigger',
        /not allowed by the rule-pack profile/,
      ],
      [
        'a dynamicValue on a card action',
        mutate((_, a) => {
          a[0]!.dynamicValue = [
            { path: 'title', expression: { language: 'text/fhirpath', expression: "'x'" } },
          ];
        }),
        'action[0].dynamicValue',
        /only for suggestion actions/,
      ],
      [
        'a missing priority',
        mutate((_, a) => {
          delete a[0]!.priority;
        }),
        'action[0].priority',
        /required/,
      ],
      [
        'duplicate rule ids',
        mutate((_, a) => {
          a[1]!.id = 'warfarin-nsaid';
        }),
        '(root)',
        /cellcds-pd-2/,
      ],
      [
        'a rule id that is not lower-kebab',
        mutate((_, a) => {
          a[0]!.id = 'Warfarin_NSAID';
        }),
        'action[0].id',
        /cellcds-pd-3/,
      ],
      [
        'no name and no rule-pack identifier',
        mutate((pd) => {
          delete pd.name;
          delete pd.identifier;
        }),
        '(root)',
        /cellcds-pd-1/,
      ],
      [
        'a definitionCanonical that names nothing contained',
        mutate((_, a) => {
          ((a[0]!.action as Json[])[0]!.action as Json[])[1]!.definitionCanonical = '#missing';
        }),
        'action[0].action[0].action[1].definitionCanonical',
        /'#missing' is not a contained resource/,
      ],
      [
        'an action type that is not create, update or remove',
        mutate((_, a) => {
          ((a[0]!.action as Json[])[0]!.action as Json[])[0]!.type = {
            coding: [
              { system: 'http://terminology.hl7.org/CodeSystem/action-type', code: 'fire-event' },
            ],
          };
        }),
        'action[0].action[0].action[0].type',
        /create, update or remove/,
      ],
      [
        'a selectionBehavior CDS Hooks has no word for',
        mutate((_, a) => {
          a[0]!.selectionBehavior = 'all';
        }),
        'action[0].selectionBehavior',
        /any and at-most-one/,
      ],
      [
        'a 3.0-ballot prefetch token',
        mutate((_, __, x) => {
          (x[0]!.extension as Json[])[4] = {
            url: 'prefetch',
            extension: [
              { url: 'key', valueString: 'labs' },
              { url: 'template', valueString: 'Observation?date=gt{{today() - 90 days}}' },
            ],
          };
        }),
        'extension[0].extension[4]',
        /prefetch 'labs': .*3\.0-ballot/,
      ],
      [
        'a second service for the same hook',
        mutate((_, __, x) => {
          x.push({
            url: 'http://cellcds.dev/fhir/StructureDefinition/cds-service',
            extension: [{ url: 'hook', valueCode: 'order-sign' }],
          });
        }),
        'extension[4]',
        /a second service for hook 'order-sign'/,
      ],
      [
        'an unknown part in the cds-service extension',
        mutate((_, __, x) => {
          (x[1]!.extension as Json[]).push({ url: 'colour', valueString: 'red' });
        }),
        'extension[1].extension[4]',
        /unknown .* part 'colour'/,
      ],
      [
        'a let in another language',
        mutate((_, __, x) => {
          (x[2]!.valueExpression as Json).language = 'text/cql';
        }),
        'extension[2].valueExpression.language',
        /must be text\/fhirpath/,
      ],
      [
        'a library that is not contained',
        mutate((pd) => {
          pd.library = ['http://fhir.org/guides/cdc/opioid-cds/Library/OpioidCDSREC11'];
        }),
        'library[0]',
        /only contained Libraries/,
      ],
      [
        'a contained ValueSet with no codes',
        mutate((pd) => {
          (pd.contained as Json[])[3] = {
            resourceType: 'ValueSet',
            id: 'egfr',
            name: 'egfr',
            status: 'active',
          };
        }),
        'contained[3]',
        /lists no codes/,
      ],
      [
        'a property R4 does not define',
        mutate((_, a) => {
          a[0]!.bogus = true;
        }),
        'action[0].bogus',
        /Invalid additional property/,
      ],
    ];
    for (const [name, resource, problemPath, message] of bad) {
      it(name, () => {
        const problems = problemsOf(resource);
        const hit = problems.find((p) => p.path === problemPath);
        expect(hit, JSON.stringify(problems)).not.to.equal(undefined);
        expect(hit!.message).to.match(message);
      });
    }

    it('lists every problem, not only the first', () => {
      const problems = problemsOf(
        mutate((pd, a) => {
          delete pd.version;
          delete a[0]!.priority;
          a[1]!.trigger = [{ type: 'data-added', name: 'patient-view' }];
        }),
      );
      expect(problems.map((p) => p.path)).to.include.members([
        'version',
        'action[0].priority',
        'action[1].trigger[0].type',
      ]);
    });

    it('the published PDDI warfarin-NSAID PlanDefinition (CQL conditions) with exact paths', () => {
      const published = readJson(
        path.join(FIXTURES, 'pddi-cds/resources/PlanDefinition-warfarin-nsaids-cds-sign.json'),
      );
      const problems = problemsOf(published);
      expect(problems.length).to.be.greaterThan(3);
      expect(problems).to.deep.include({
        path: 'action[0].condition[0].expression.language',
        message: 'must be "text/fhirpath"',
      });
      expect(problems.map((p) => p.path)).to.include.members(['action[0].id', 'action[0].title']);
      expect(problems.every((p) => p.path !== '' && p.message !== '')).to.equal(true);
    });

    it('a value that is not a PlanDefinition', () => {
      expect(problemsOf({ resourceType: 'Patient' })).to.deep.equal([
        { path: 'resourceType', message: 'must be PlanDefinition' },
      ]);
      expect(problemsOf('text')).to.have.length(1);
    });
  });

  it('keeps a __proto__ prefetch key as plain data (validatePack then refuses the key)', () => {
    const resource = mutate((_, __, x) => {
      (x[0]!.extension as Json[])[4] = {
        url: 'prefetch',
        extension: [
          { url: 'key', valueString: '__proto__' },
          { url: 'template', valueString: 'Patient/{{context.patientId}}' },
        ],
      };
    });
    const prefetch = planDefinitionToPack(resource).services[0]!.prefetch!;
    expect(Object.keys(prefetch)).to.deep.equal(['__proto__']);
    expect(Object.getPrototypeOf(prefetch)).to.equal(Object.prototype);
    expect(({} as Json).patient).to.equal(undefined);
  });
});
