import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  createEvaluator,
  PackValidationError,
  packHash,
  parsePackText,
  resolvePackFiles,
  validatePack,
} from '../../rules/index.ts';
import type { Evaluator, PackProblem, RulePack } from '../../rules/index.ts';

const PACKS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/packs');
const PLAN_DEFINITION = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '../../rules/packs/plandefinition-example/plandefinition.json',
);

/** A small valid pack; each table row breaks one thing in a copy. */
function basePack(): RulePack {
  return {
    id: 'table-pack',
    version: '1.0.0',
    title: 'Table pack',
    publisher: 'cellcds specs',
    description: 'Base of the invalid-pack table.',
    services: [
      {
        id: 'tp-order-sign',
        hook: 'order-sign',
        description: 'Order checks',
        prefetch: { patient: 'Patient/{{context.patientId}}' },
      },
      { id: 'tp-patient-view', hook: 'patient-view', description: 'Chart checks' },
    ],
    valueSets: {
      nsaids: {
        codes: [{ system: 'http://www.nlm.nih.gov/research/umls/rxnorm', code: '849574' }],
      },
    },
    let: { drafts: '%draftOrders.entry.resource.ofType(MedicationRequest)' },
    rules: [
      {
        id: 'draft-nsaid',
        service: 'tp-order-sign',
        when: "%drafts.medication.ofType(CodeableConcept).inValueSet('nsaids')",
        card: {
          summary: 'NSAID ordered',
          indicator: 'warning',
          source: { label: 'specs' },
          links: [{ label: 'Guidance', url: 'https://example.org/nsaids', type: 'absolute' }],
          overrideReasons: [
            { system: 'http://example.org/r', code: 'ok', display: 'Clinically appropriate' },
          ],
          suggestions: [
            {
              label: 'Cancel the NSAID',
              actions: [
                {
                  type: 'delete',
                  description: 'Remove the draft',
                  resourceId: 'MedicationRequest/{{ %drafts.first().id }}',
                },
              ],
            },
          ],
        },
      },
      {
        id: 'female',
        service: 'tp-patient-view',
        when: "%patient.gender = 'female'",
        card: { summary: 'Female', indicator: 'info', source: { label: 'specs' } },
      },
      {
        id: 'male',
        service: 'tp-patient-view',
        when: "%patient.gender = 'male'",
        card: { summary: 'Male', indicator: 'info', source: { label: 'specs' } },
      },
      {
        id: 'unknown-gender',
        service: 'tp-patient-view',
        when: '%patient.gender.empty()',
        card: { summary: 'Unknown', indicator: 'info', source: { label: 'specs' } },
      },
    ],
    tests: [
      {
        name: 'female chart',
        service: 'tp-patient-view',
        now: '2024-05-01T00:00:00Z',
        request: {
          hook: 'patient-view',
          context: { userId: 'Practitioner/1', patientId: 'p' },
          prefetch: { patient: { resourceType: 'Patient', id: 'p', gender: 'female' } },
        },
        expect: { fire: ['female'], notFire: ['male', 'unknown-gender'] },
      },
    ],
  };
}

type Mutate = (p: RulePack & Record<string, unknown>) => void;

// [what, mutation, expected problem]
const table: Array<[string, Mutate, PackProblem]> = [
  [
    'an unknown field, with its path',
    (p) => {
      (p.rules[1] as unknown as Record<string, unknown>).crd = { summary: 'x' };
    },
    { path: 'rules[1].crd', message: 'unknown field' },
  ],
  [
    'an unknown top-level field',
    (p) => (p.author = 'me'),
    { path: 'author', message: 'unknown field' },
  ],
  [
    'an unquoted version (a YAML number), with the quoted semver to write',
    (p) => ((p as Record<string, unknown>).version = 1.1),
    {
      path: 'version',
      message: 'expected string, got number: write it as a quoted semantic version, e.g. "1.1.0"',
    },
  ],
  [
    'a missing indicator as required, with its values',
    (p) => delete (p.rules[0]!.card as unknown as Record<string, unknown>).indicator,
    { path: 'rules[0].card.indicator', message: 'required (info, warning or critical)' },
  ],
  [
    'a wrong indicator with its values',
    (p) => ((p.rules[0]!.card as unknown as Record<string, unknown>).indicator = 'high'),
    { path: 'rules[0].card.indicator', message: 'must be info, warning or critical' },
  ],
  [
    'a missing hook as required, with its values',
    (p) => delete (p.services[1] as unknown as Record<string, unknown>).hook,
    {
      path: 'services[1].hook',
      message: 'required (one of patient-view, order-select, order-sign)',
    },
  ],
  [
    'a missing link type as required, with its values',
    (p) => delete (p.rules[0]!.card.links![0] as unknown as Record<string, unknown>).type,
    { path: 'rules[0].card.links[0].type', message: 'required (absolute or smart)' },
  ],
  [
    'a missing action type as required, with its values',
    (p) =>
      delete (p.rules[0]!.card.suggestions![0]!.actions![0] as unknown as Record<string, unknown>)
        .type,
    {
      path: 'rules[0].card.suggestions[0].actions[0].type',
      message: 'required (create, update or delete)',
    },
  ],
  [
    'a value set system that differs in case from RxNorm',
    (p) => (p.valueSets!.nsaids!.codes[0]!.system = 'http://www.nlm.nih.gov/research/umls/RxNorm'),
    {
      path: 'valueSets.nsaids.codes[0].system',
      message:
        "not the RxNorm system URL: did you mean 'http://www.nlm.nih.gov/research/umls/rxnorm'? (a code system URL must match exactly: this one never matches an EHR's coding)",
    },
  ],
  [
    'a value set system with a trailing slash',
    (p) => (p.valueSets!.nsaids!.codes[0]!.system = 'http://loinc.org/'),
    {
      path: 'valueSets.nsaids.codes[0].system',
      message:
        "not the LOINC system URL: did you mean 'http://loinc.org'? (a code system URL must match exactly: this one never matches an EHR's coding)",
    },
  ],
  [
    'a version that is not semver',
    (p) => (p.version = '1.0'),
    { path: 'version', message: 'must be a semantic version (e.g. 1.2.0)' },
  ],
  [
    'a v-prefixed version',
    (p) => (p.version = 'v1.0.0'),
    { path: 'version', message: 'must be a semantic version (e.g. 1.2.0)' },
  ],
  [
    'a pack id with capitals',
    (p) => (p.id = 'Table_Pack'),
    {
      path: 'id',
      message: 'invalid pack id (lowercase letters, digits and -, 2 to 64 characters)',
    },
  ],
  [
    'a hook we do not serve',
    (p) => ((p.services[0] as { hook: string }).hook = 'order-dispatch'),
    { path: 'services[0].hook', message: 'must be one of patient-view, order-select, order-sign' },
  ],
  [
    'a missing title',
    (p) => delete (p as Partial<RulePack>).title,
    { path: 'title', message: 'required' },
  ],
  [
    'a mistyped field',
    (p) => ((p as unknown as Record<string, unknown>).rules = 'all'),
    { path: 'rules', message: 'expected array, got string' },
  ],
  [
    'an unknown function, with its column',
    (p) => (p.rules[1]!.when = '%patient.gender.existss()'),
    { path: 'rules[1].when', message: "unknown function 'existss' at column 17" },
  ],
  [
    'an unknown function on a later line',
    (p) =>
      (p.rules[1]!.when =
        "%patient.gender = 'female'\n  and %patient.name.wherre(use = 'official').exists()"),
    { path: 'rules[1].when', message: "unknown function 'wherre' at line 2, column 21" },
  ],
  [
    'an Object.prototype name used as a function',
    (p) => (p.rules[1]!.when = '%patient.constructor().exists()'),
    { path: 'rules[1].when', message: "unknown function 'constructor' at column 10" },
  ],
  [
    'an unknown %variable',
    (p) => (p.rules[1]!.when = "%patientt.gender = 'female'"),
    { path: 'rules[1].when', message: "unknown variable '%patientt' at column 1" },
  ],
  [
    'a FHIRPath syntax error',
    (p) => (p.rules[1]!.when = '%patient.gender.'),
    { path: 'rules[1].when', message: "syntax error: mismatched input '<EOF>' at column 17" },
  ],
  [
    'an unknown type name',
    (p) => (p.let = { drafts: '%draftOrders.entry.resource.ofType(MedicationRequst)' }),
    { path: 'let.drafts', message: "unknown type 'MedicationRequst' at column 36" },
  ],
  [
    'an unknown value set',
    (p) => (p.rules[0]!.when = "%drafts.medication.ofType(CodeableConcept).inValueSet('nsiads')"),
    { path: 'rules[0].when', message: "unknown value set 'nsiads' at column 44" },
  ],
  [
    'an unknown function inside a {{ }} interpolation (column in the text)',
    (p) => (p.rules[1]!.card.summary = 'Female ({{ %patient.birthDate.toDatee() }})'),
    { path: 'rules[1].card.summary', message: "unknown function 'toDatee' at column 31" },
  ],
  [
    'an unknown %variable in a suggestion resourceId',
    (p) =>
      (p.rules[0]!.card.suggestions![0]!.actions![0]!.resourceId =
        'MedicationRequest/{{ %draft.id }}'),
    {
      path: 'rules[0].card.suggestions[0].actions[0].resourceId',
      message: "unknown variable '%draft' at column 22",
    },
  ],
  [
    'an unterminated {{',
    (p) => (p.rules[1]!.card.detail = 'line one\nsee {{ %patient.id'),
    { path: 'rules[1].card.detail', message: 'unterminated {{ at line 2, column 5' },
  ],
  [
    'a summary of 140 characters',
    (p) => (p.rules[1]!.card.summary = 'x'.repeat(140)),
    { path: 'rules[1].card.summary', message: 'must be under 140 characters (got 140)' },
  ],
  [
    'a summary whose static text alone is too long',
    (p) => (p.rules[1]!.card.summary = `${'x'.repeat(140)} {{ %patient.id }}`),
    { path: 'rules[1].card.summary', message: 'must be under 140 characters (static text is 141)' },
  ],
  [
    'a bad indicator',
    (p) => ((p.rules[1]!.card as { indicator: string }).indicator = 'hard-stop'),
    { path: 'rules[1].card.indicator', message: 'must be info, warning or critical' },
  ],
  [
    'an empty source label',
    (p) => (p.rules[1]!.card.source.label = ''),
    { path: 'rules[1].card.source.label', message: 'must not be empty' },
  ],
  [
    'a relative source url',
    (p) => (p.rules[1]!.card.source.url = '/about'),
    { path: 'rules[1].card.source.url', message: 'must be an absolute http(s) URL' },
  ],
  [
    'a link with a bad type',
    (p) => ((p.rules[0]!.card.links![0] as { type: string }).type = 'web'),
    { path: 'rules[0].card.links[0].type', message: 'must be absolute or smart' },
  ],
  [
    'a link with a relative url',
    (p) => (p.rules[0]!.card.links![0]!.url = 'guidance/nsaids'),
    { path: 'rules[0].card.links[0].url', message: 'must be an absolute http(s) URL' },
  ],
  [
    'a link with a javascript: url',
    (p) => (p.rules[0]!.card.links![0]!.url = 'javascript:alert(1)'),
    { path: 'rules[0].card.links[0].url', message: 'must be an absolute http(s) URL' },
  ],
  [
    'appContext on an absolute link',
    (p) => (p.rules[0]!.card.links![0]!.appContext = '{"a":1}'),
    { path: 'rules[0].card.links[0].appContext', message: 'only allowed on smart links' },
  ],
  [
    'an override reason without display',
    (p) => delete p.rules[0]!.card.overrideReasons![0]!.display,
    { path: 'rules[0].card.overrideReasons[0].display', message: 'required in overrideReasons' },
  ],
  [
    'an action without description',
    (p) => (p.rules[0]!.card.suggestions![0]!.actions![0]!.description = ''),
    { path: 'rules[0].card.suggestions[0].actions[0].description', message: 'must not be empty' },
  ],
  [
    'a delete carrying a resource',
    (p) =>
      (p.rules[0]!.card.suggestions![0]!.actions![0]!.resource = {
        resourceType: 'MedicationRequest',
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[0].resource',
      message: 'delete uses resourceId, not resource',
    },
  ],
  [
    'a delete without resourceId',
    (p) => delete p.rules[0]!.card.suggestions![0]!.actions![0]!.resourceId,
    {
      path: 'rules[0].card.suggestions[0].actions[0].resourceId',
      message: 'required for delete (Type/id)',
    },
  ],
  [
    'an update whose static resource id is not a FHIR id',
    (p) =>
      p.rules[0]!.card.suggestions![0]!.actions!.push({
        type: 'update',
        description: 'Lower the dose',
        resource: {
          resourceType: 'MedicationRequest',
          id: 'rx 1',
          status: 'draft',
          intent: 'order',
          subject: { reference: 'Patient/p1' },
          medicationCodeableConcept: { text: 'warfarin 2 mg' },
        },
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[1].resource.id',
      message: 'must be a FHIR id (1-64 of A-Z a-z 0-9 - .)',
    },
  ],
  [
    'a create whose static resource id is a reference, not an id',
    (p) =>
      p.rules[0]!.card.suggestions![0]!.actions!.push({
        type: 'create',
        description: 'Order a lab',
        resource: {
          resourceType: 'ServiceRequest',
          id: 'ServiceRequest/1',
          status: 'draft',
          intent: 'order',
          subject: { reference: 'Patient/p1' },
          code: { text: 'INR' },
        },
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[1].resource.id',
      message: 'must be a FHIR id (1-64 of A-Z a-z 0-9 - .)',
    },
  ],
  [
    'a create whose static resource holds a reference without an id (Patient/)',
    (p) =>
      p.rules[0]!.card.suggestions![0]!.actions!.push({
        type: 'create',
        description: 'Order a lab',
        resource: {
          resourceType: 'ServiceRequest',
          status: 'draft',
          intent: 'order',
          subject: { reference: 'Patient/' },
          code: { text: 'INR' },
        },
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[1].resource.subject.reference',
      message:
        'must be a FHIR reference (Type/id, an absolute URL to one, #id, urn:uuid or urn:oid)',
    },
  ],
  [
    'an update whose resource has no id (the EHR cannot tell which resource to replace)',
    (p) =>
      p.rules[0]!.card.suggestions![0]!.actions!.push({
        type: 'update',
        description: 'Lower the dose',
        resource: {
          resourceType: 'MedicationRequest',
          status: 'draft',
          intent: 'order',
          subject: { reference: 'Patient/p1' },
          medicationCodeableConcept: { text: 'warfarin 2 mg' },
        },
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[1].resource.id',
      message: 'required for update (the id of the resource it replaces)',
    },
  ],
  [
    'a static suggestion resource that is not valid FHIR',
    (p) =>
      p.rules[0]!.card.suggestions![0]!.actions!.push({
        type: 'create',
        description: 'Order acetaminophen',
        resource: {
          resourceType: 'MedicationRequest',
          status: 'draft',
          intent: 'order',
          subject: { reference: 'Patient/1' },
        },
      }),
    {
      path: 'rules[0].card.suggestions[0].actions[1].resource.medication[x]',
      message: 'Missing required property',
    },
  ],
  [
    'two recommended suggestions under at-most-one',
    (p) => {
      const s = p.rules[0]!.card.suggestions!;
      s[0]!.isRecommended = true;
      s.push({ label: 'Keep', isRecommended: true });
    },
    {
      path: 'rules[0].card.suggestions',
      message: 'at most one suggestion may be recommended unless selectionBehavior is any',
    },
  ],
  [
    'a duplicate rule id',
    (p) => p.rules.push({ ...structuredClone(p.rules[1]!), when: "%patient.gender = 'other'" }),
    { path: 'rules[4].id', message: "duplicate rule id 'female'" },
  ],
  [
    'a rule whose condition can never be true',
    (p) => (p.rules[1]!.when = 'false'),
    {
      path: 'rules[1].when',
      message: "rule 'female' can never fire: its condition is always false",
    },
  ],
  [
    'a duplicate service id',
    (p) => p.services.push({ id: 'tp-order-sign', hook: 'order-select', description: 'again' }),
    { path: 'services[2].id', message: "duplicate service id 'tp-order-sign'" },
  ],
  [
    'a rule for a missing service',
    (p) => (p.rules[0]!.service = 'tp-order-select'),
    { path: 'rules[0].service', message: "unknown service 'tp-order-select'" },
  ],
  [
    'a prefetch template with a FHIRPath token',
    (p) =>
      (p.services[0]!.prefetch = {
        labs: 'Observation?patient={{context.patientId}}&date=ge{{today() - 90 days}}',
      }),
    {
      path: 'services[0].prefetch.labs',
      message:
        "'{{today() - 90 days}}' is not a CDS Hooks 2.0 prefetch token (FHIRPath tokens are 3.0-ballot only)",
    },
  ],
  [
    'an absolute prefetch URL',
    (p) => (p.services[0]!.prefetch = { patient: 'https://evil.example/Patient' }),
    {
      path: 'services[0].prefetch.patient',
      message: 'must be a relative FHIR URL (no scheme, no leading slash)',
    },
  ],
  [
    'a reserved let name',
    (p) => (p.let = { ...p.let, context: '1' }),
    { path: 'let.context', message: "'context' is a reserved name" },
  ],
  [
    'a let named like a value set',
    (p) => (p.let = { ...p.let, nsaids: '1' }),
    { path: 'let.nsaids', message: "'nsaids' is also the name of a value set" },
  ],
  [
    'lets that form a cycle',
    (p) => (p.let = { ...p.let, a: '%b + 1', b: '%a + 1' }),
    { path: 'let.a', message: 'lets form a cycle: a -> b -> a' },
  ],
  [
    'a let name that is not an identifier',
    (p) => (p.let = { ...p.let, 'my-let': '1' }),
    {
      path: 'let.my-let',
      message: 'invalid name (a letter, then letters, digits or _, at most 64 characters)',
    },
  ],
  [
    'a test for a missing service',
    (p) => (p.tests![0]!.service = 'nope'),
    { path: 'tests[0].service', message: "unknown service 'nope'" },
  ],
  [
    'a test expecting an unknown rule',
    (p) => (p.tests![0]!.expect.fire = ['femalee']),
    { path: 'tests[0].expect.fire[0]', message: "unknown rule 'femalee'" },
  ],
  [
    'a test expecting a rule of another service',
    (p) => (p.tests![0]!.expect.notFire = ['draft-nsaid']),
    {
      path: 'tests[0].expect.notFire[0]',
      message: "rule 'draft-nsaid' belongs to service 'tp-order-sign', not 'tp-patient-view'",
    },
  ],
  [
    'a test whose request is for another hook',
    (p) => (p.tests![0]!.request!.hook = 'order-sign'),
    { path: 'tests[0].request.hook', message: "service 'tp-patient-view' serves patient-view" },
  ],
  [
    'a test with a file but no base directory',
    (p) => {
      delete p.tests![0]!.request;
      p.tests![0]!.requestFile = 'requests/x.json';
    },
    {
      path: 'tests[0].requestFile',
      message:
        'a test file cannot be read in an upload (no base directory): push the pack with `npx cellcds pack push <file>`, which inlines test files, or give the test an inline request',
    },
  ],
  [
    'a test with two request sources',
    (p) => (p.tests![0]!.patientBundle = 'patient.json'),
    { path: 'tests[0]', message: 'needs exactly one of request, requestFile, patientBundle' },
  ],
  [
    'a test with a bad now',
    (p) => (p.tests![0]!.now = 'yesterday'),
    { path: 'tests[0].now', message: 'must be an ISO 8601 date or dateTime' },
  ],
  [
    'a test whose now is a date that does not exist (Date would read 2021-02-30 as March 2nd)',
    (p) => (p.tests![0]!.now = '2021-02-30'),
    { path: 'tests[0].now', message: 'must be an ISO 8601 date or dateTime' },
  ],
  [
    'a failing embedded test',
    (p) => (p.tests![0]!.expect = { fire: ['male'] }),
    { path: 'tests[0]', message: 'expected rule male to fire' },
  ],
  [
    'an embedded test that expects a rule not to fire',
    (p) => (p.tests![0]!.expect = { notFire: ['female'] }),
    { path: 'tests[0]', message: 'expected rule female not to fire' },
  ],
];

async function problemsOf(
  raw: unknown,
  opts: Parameters<typeof validatePack>[1] = {},
): Promise<PackProblem[]> {
  try {
    await validatePack(raw, opts);
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  return expect.fail('expected a PackValidationError');
}

describe('rules: validatePack', () => {
  let evaluator: Evaluator;
  before(async () => {
    evaluator = createEvaluator({ workers: 1 });
    // A worker starting on a loaded machine would otherwise eat the first test's call budget.
    await evaluator.ready();
  });
  after(async () => {
    await evaluator.close();
  });

  it('accepts the base pack and runs its test', async () => {
    const compiled = await validatePack(basePack(), { evaluator });
    expect(compiled.id).to.equal('table-pack');
    expect(compiled.hash).to.equal(packHash(basePack()));
    expect(Object.isFrozen(compiled.pack)).to.equal(true);
  });

  for (const [what, mutate, problem] of table) {
    it(`reports ${what}`, async () => {
      const pack = basePack() as RulePack & Record<string, unknown>;
      mutate(pack);
      const problems = await problemsOf(pack, { evaluator });
      expect(problems).to.deep.include(problem);
      expect(problems, JSON.stringify(problems)).to.have.length(1);
    });
  }

  it('reports every problem of a pack with several at once', async () => {
    const pack = basePack() as RulePack & Record<string, unknown>;
    pack.version = 'latest';
    (pack.rules[1] as unknown as Record<string, unknown>).crd = {};
    pack.rules[2]!.when = "%patient.gender.existss() or %nope = 'x'";
    pack.rules[3]!.card.summary = 'y'.repeat(150);
    pack.rules[0]!.service = 'gone';
    pack.rules[0]!.card.links![0]!.appContext = 'x';
    pack.services[0]!.prefetch = { bad: '/Patient/{{context.patientId}}' };
    const problems = await problemsOf(pack, { evaluator });
    expect(problems).to.have.deep.members([
      { path: 'version', message: 'must be a semantic version (e.g. 1.2.0)' },
      { path: 'rules[1].crd', message: 'unknown field' },
      { path: 'rules[2].when', message: "unknown function 'existss' at column 17" },
      { path: 'rules[2].when', message: "unknown variable '%nope' at column 30" },
      { path: 'rules[3].card.summary', message: 'must be under 140 characters (got 150)' },
      { path: 'rules[0].service', message: "unknown service 'gone'" },
      { path: 'rules[0].card.links[0].appContext', message: 'only allowed on smart links' },
      {
        path: 'services[0].prefetch.bad',
        message: 'must be a relative FHIR URL (no scheme, no leading slash)',
      },
    ]);
  });

  it('reports a failing test per expectation, and a broken rule in a test', async () => {
    const pack = basePack();
    pack.rules[1]!.when = '%patient.gender.single().toInteger() > 1 and (1|2).single() = 1';
    pack.tests![0]!.expect = { fire: ['female', 'male'] };
    const problems = await problemsOf(pack, { evaluator });
    expect(problems).to.have.length(2);
    expect(problems[0]).to.deep.equal({
      path: 'tests[0]',
      message: 'expected rule female to fire (error: when: Expected single)',
    });
    expect(problems[1]).to.deep.equal({ path: 'tests[0]', message: 'expected rule male to fire' });
  });

  it('skips the embedded tests when runTests is false', async () => {
    const pack = basePack();
    pack.tests![0]!.expect = { fire: ['male'] };
    const compiled = await validatePack(pack, { runTests: false });
    expect(compiled.pack.tests).to.have.length(1);
  });

  it('refuses __proto__ keys anywhere (prototype pollution)', async () => {
    const raw = parsePackText(
      JSON.stringify(basePack()).replace(
        '"tests":[',
        '"tests":[{"name":"x","__proto__":{"polluted":true}},',
      ),
    );
    const problems = await problemsOf(raw);
    expect(problems).to.deep.equal([{ path: 'tests[0].__proto__', message: 'forbidden key' }]);
    expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
  });

  it('refuses something that is not a pack object', async () => {
    expect(await problemsOf(['a'])).to.deep.equal([
      { path: '(pack)', message: 'a pack must be an object' },
    ]);
  });

  it('validates the full test pack with its file-based tests resolved from baseDir', async () => {
    const raw = parsePackText(fs.readFileSync(path.join(PACKS, 'full-pack.yaml'), 'utf8'));
    const compiled = await validatePack(raw, { baseDir: PACKS, evaluator });
    const tests = compiled.pack.tests ?? [];
    expect(tests).to.have.length(5);
    for (const t of tests) {
      expect(t.request, t.name).to.be.an('object');
      expect(t).to.not.have.any.keys('requestFile', 'patientBundle', 'draftOrders');
    }
    // The uploaded form (resolvePackFiles) is the same content, hence the same hash.
    const resolved = resolvePackFiles(raw, PACKS) as RulePack;
    expect(packHash(resolved)).to.equal(compiled.hash);
    // Without a base directory the file-based tests are problems, not silently skipped.
    const problems = await problemsOf(raw, { evaluator });
    expect(problems.map((p) => p.path)).to.deep.equal([
      'tests[2].requestFile',
      'tests[3].patientBundle',
      'tests[4].patientBundle',
    ]);
  });

  it('accepts a pack authored as a PlanDefinition (converted to the same internal form)', async () => {
    const pd = JSON.parse(fs.readFileSync(PLAN_DEFINITION, 'utf8')) as Record<string, unknown>;
    const compiled = await validatePack(pd, { evaluator });
    expect(compiled.pack.rules.map((r) => r.id)).to.include('warfarin-nsaid');
    expect(compiled.pack.services.map((s) => s.hook)).to.include('order-sign');
  });

  it('checks the FHIRPath of a PlanDefinition condition like any rule', async () => {
    const pd = JSON.parse(fs.readFileSync(PLAN_DEFINITION, 'utf8')) as {
      action: Array<{ condition: Array<{ expression: { expression: string } }> }>;
    };
    pd.action[0]!.condition[0]!.expression.expression = '%nsaidDraft.existss()';
    const problems = await problemsOf(pd, { evaluator });
    expect(problems).to.have.length(1);
    expect(problems[0]?.path).to.equal('rules[0].when');
    expect(problems[0]?.message).to.match(/^unknown function 'existss' at column \d+$/);
  });

  it('names an unreadable test file', async () => {
    const raw = parsePackText(
      fs.readFileSync(path.join(PACKS, 'full-pack.yaml'), 'utf8'),
    ) as RulePack;
    raw.tests![2]!.requestFile = 'requests/missing.json';
    const problems = await problemsOf(raw, { baseDir: PACKS, evaluator });
    expect(problems).to.deep.equal([
      {
        path: 'tests[2].requestFile',
        message: `cannot use requests/missing.json: file not found (looked for ${path.join(PACKS, 'requests/missing.json')}; paths are relative to the pack file's folder)`,
      },
    ]);
  });
});
