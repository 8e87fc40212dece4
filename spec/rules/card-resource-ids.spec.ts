import { expect } from 'chai';
import { compilePack, createEvaluator, findBadReference } from '../../rules/index.ts';
import type {
  ActionTemplate,
  CardTemplate,
  EvaluationInput,
  Evaluator,
  PackRule,
  RulePack,
} from '../../rules/index.ts';

/** A planted patient name: it must never appear in an error message. */
const PLANTED = 'Zebulon';
/** Absent in input(): interpolates to "". */
const EMPTY = '{{ %patient.name.text }}';

function pack(rules: PackRule[]): RulePack {
  return {
    id: 'resource-id-pack',
    version: '1.0.0',
    title: 'Resource ids',
    publisher: 'specs',
    description: 'Interpolated resource ids',
    services: [{ id: 'svc', hook: 'order-sign', description: 'main service' }],
    rules,
  };
}

function input(draftId?: string): EvaluationInput {
  return {
    hook: 'order-sign',
    hookInstance: '0f8f3a55-1d2b-4f7e-9f8e-4a6a3c5d7e90',
    now: new Date('2024-02-29T10:15:00.000Z'),
    context: {
      userId: 'Practitioner/1',
      patientId: 'p1',
      draftOrders: {
        resourceType: 'Bundle',
        entry: [
          {
            resource: {
              resourceType: 'MedicationRequest',
              ...(draftId === undefined ? {} : { id: draftId }),
              status: 'draft',
            },
          },
        ],
      },
    },
    prefetch: {
      patient: {
        resourceType: 'Patient',
        id: 'p1',
        name: [{ given: [PLANTED, 'Q'], family: 'Xylo' }],
      },
    },
  };
}

function cardWith(actions: ActionTemplate[]): CardTemplate {
  return {
    summary: 'Check this order',
    indicator: 'warning',
    source: { label: 'specs' },
    suggestions: [{ label: 'Do it', actions }],
  };
}

const DRAFT_ID = '{{ %draftOrders.entry.resource.id }}';
/** A suggestion's action with nothing interpolated: always kept. */
const KEPT: ActionTemplate = {
  type: 'create',
  description: 'Order a lab',
  resource: { resourceType: 'ServiceRequest', status: 'draft' },
};
const ok: PackRule = {
  id: 'ok',
  service: 'svc',
  when: 'true',
  card: { summary: 'fine', indicator: 'info', source: { label: 'specs' } },
};

describe('rules: interpolated resource ids must be valid FHIR ids', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(() => {
    evaluator = createEvaluator({ workers: 0 });
  });
  after(async () => {
    await evaluator.close();
  });

  const P = 'card.suggestions[0].actions[0]';
  const bad: Array<[string, ActionTemplate, string | undefined, string]> = [
    [
      'a delete of Type/ (the draft has no id)',
      { type: 'delete', description: 'Cancel', resourceId: `MedicationRequest/${DRAFT_ID}` },
      undefined,
      `${P}.resourceId: not a relative reference Type/id after interpolation`,
    ],
    [
      'a delete whose id is not a FHIR id (spaces, a joined collection)',
      {
        type: 'delete',
        description: 'Cancel',
        resourceId: 'MedicationRequest/{{ %patient.name.given }}',
      },
      'd1',
      `${P}.resourceId: not a relative reference Type/id after interpolation`,
    ],
    [
      'a delete with no type',
      { type: 'delete', description: 'Cancel', resourceId: DRAFT_ID },
      'd1',
      `${P}.resourceId: not a relative reference Type/id after interpolation`,
    ],
    [
      'a delete whose id is longer than 64 characters',
      { type: 'delete', description: 'Cancel', resourceId: `MedicationRequest/${DRAFT_ID}` },
      'a'.repeat(65),
      `${P}.resourceId: not a relative reference Type/id after interpolation`,
    ],
    [
      'a wholly empty delete resourceId (as before)',
      { type: 'delete', description: 'Cancel', resourceId: EMPTY },
      'd1',
      `${P}.resourceId: empty after interpolation (required for delete)`,
    ],
    [
      'an update whose resource id is not a FHIR id',
      {
        type: 'update',
        description: 'Lower the dose',
        resource: { resourceType: 'MedicationRequest', id: `${DRAFT_ID}/x`, status: 'draft' },
      },
      'd1',
      `${P}.resource: id is not a valid FHIR id after interpolation`,
    ],
    [
      'an update whose resource id is a typed collection (not one string)',
      {
        type: 'update',
        description: 'Lower the dose',
        resource: {
          resourceType: 'MedicationRequest',
          id: '{{ %patient.name.given }}',
          status: 'draft',
        },
      },
      'd1',
      `${P}.resource: id is not a valid FHIR id after interpolation`,
    ],
    [
      'a create whose resource id is not a FHIR id',
      {
        type: 'create',
        description: 'Order a lab',
        resource: {
          resourceType: 'ServiceRequest',
          id: 'lab {{ %patient.name.given }}',
          status: 'draft',
        },
      },
      'd1',
      `${P}.resource: id is not a valid FHIR id after interpolation`,
    ],
  ];
  for (const [name, action, draftId, error] of bad) {
    it(`drops the suggestion for ${name}, naming the field, and keeps the card (the alert matters more)`, async () => {
      const card = cardWith([action]);
      card.suggestions = [...(card.suggestions ?? []), { label: 'Keep me', actions: [KEPT] }];
      const compiled = compilePack(pack([{ id: 'bad', service: 'svc', when: 'true', card }, ok]));
      const result = await evaluator.evaluate(compiled, 'svc', input(draftId));
      expect(result.trace[0]).to.include({
        ruleId: 'bad',
        status: 'fired',
        fired: true,
        error: `suggestion dropped: ${error}`,
      });
      expect(result.trace[1]).to.include({ ruleId: 'ok', status: 'fired' });
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['bad', 'ok']);
      expect(result.cards[0]?.suggestions?.map((x) => x.label)).to.deep.equal(['Keep me']);
      const trace = JSON.stringify(result.trace);
      expect(trace).to.not.contain(PLANTED).and.to.not.contain('Xylo');
    });
  }

  it('keeps a valid interpolated delete, update and create (and drops an empty create id)', async () => {
    const compiled = compilePack(
      pack([
        {
          id: 'good',
          service: 'svc',
          when: 'true',
          card: cardWith([
            { type: 'delete', description: 'Cancel', resourceId: `MedicationRequest/${DRAFT_ID}` },
            {
              type: 'update',
              description: 'Lower',
              resource: { resourceType: 'MedicationRequest', id: DRAFT_ID, status: 'draft' },
            },
            {
              type: 'create',
              description: 'Order',
              resource: { resourceType: 'ServiceRequest', id: EMPTY, status: 'draft' },
            },
          ]),
        },
      ]),
    );
    const id = 'Ab-9.z';
    const result = await evaluator.evaluate(compiled, 'svc', input(id));
    expect(result.trace[0]).to.include({ ruleId: 'good', status: 'fired' });
    const actions = result.cards[0]?.suggestions?.[0]?.actions;
    expect(actions?.[0]?.resourceId).to.equal(`MedicationRequest/${id}`);
    expect(actions?.[1]?.resource).to.deep.include({ id });
    expect(actions?.[2]?.resource).to.not.have.property('id');
  });

  it('checks it in a worker too', async () => {
    const ev = createEvaluator({ workers: 1, callBudgetMs: 30_000, ruleBudgetMs: 20_000 });
    try {
      const compiled = compilePack(
        pack([
          {
            id: 'bad',
            service: 'svc',
            when: 'true',
            card: cardWith([
              {
                type: 'delete',
                description: 'Cancel',
                resourceId: `MedicationRequest/${DRAFT_ID}`,
              },
            ]),
          },
          ok,
        ]),
      );
      const result = await ev.evaluate(compiled, 'svc', input());
      expect(result.trace[0]).to.include({
        status: 'fired',
        error: `suggestion dropped: ${P}.resourceId: not a relative reference Type/id after interpolation`,
      });
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['bad', 'ok']);
      // Its only suggestion dropped: the card goes without suggestions (or selectionBehavior).
      expect(result.cards[0]).to.not.have.property('suggestions');
      expect(result.cards[0]).to.not.have.property('selectionBehavior');
    } finally {
      await ev.close();
    }
  });
});

describe('rules: references inside a suggestion resource must be FHIR references', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(() => {
    evaluator = createEvaluator({ workers: 0 });
  });
  after(async () => {
    await evaluator.close();
  });

  const P = 'card.suggestions[0].actions[0].resource';
  const WHY =
    'not a valid reference after interpolation (Type/id, an absolute URL to one, #id, urn:uuid or urn:oid)';
  const order = (extra: Record<string, unknown>): ActionTemplate => ({
    type: 'create',
    description: 'Order a lab',
    resource: { resourceType: 'ServiceRequest', status: 'draft', intent: 'order', ...extra },
  });
  const update = (extra: Record<string, unknown>): ActionTemplate => ({
    type: 'update',
    description: 'Lower the dose',
    resource: { resourceType: 'MedicationRequest', id: 'mr-1', status: 'draft', ...extra },
  });
  const bad: Array<[string, ActionTemplate, string]> = [
    [
      'a create whose subject is Patient/ (the draft has no id)',
      order({ subject: { reference: `Patient/${DRAFT_ID}` } }),
      `${P}.subject.reference`,
    ],
    [
      'a create whose subject is Patient/ followed by a space',
      order({ subject: { reference: `Patient/${EMPTY} `, display: 'the patient' } }),
      `${P}.subject.reference`,
    ],
    [
      'an update whose medicationReference is Medication/ (an interpolation gave nothing)',
      update({ medicationReference: { reference: `Medication/${EMPTY}` } }),
      `${P}.medicationReference.reference`,
    ],
    [
      'an update whose basedOn[1] is ServiceRequest/ (inside an array)',
      update({
        basedOn: [
          { reference: 'ServiceRequest/sr-1' },
          { reference: `ServiceRequest/${DRAFT_ID}` },
        ],
      }),
      `${P}.basedOn[1].reference`,
    ],
    [
      'a create with a broken reference deep inside (contained, extension)',
      order({
        contained: [
          {
            resourceType: 'Provenance',
            extension: [
              {
                url: 'https://example.org/ext',
                valueReference: { reference: `Practitioner/${EMPTY}` },
              },
            ],
          },
        ],
      }),
      `${P}.contained[0].extension[0].valueReference.reference`,
    ],
    [
      'a create whose reference id is a joined collection (spaces, a comma)',
      order({ subject: { reference: 'Patient/{{ %patient.name.given }}' } }),
      `${P}.subject.reference`,
    ],
    [
      'a create whose reference type is lower-case',
      order({ subject: { reference: 'patient/{{ %context.patientId }}' } }),
      `${P}.subject.reference`,
    ],
    [
      'a create whose reference version is empty',
      order({ subject: { reference: 'Patient/{{ %context.patientId }}/_history/' } }),
      `${P}.subject.reference`,
    ],
    [
      'an absolute URL whose id is empty',
      order({ subject: { reference: `https://ehr.example.org/fhir/Patient/${EMPTY}` } }),
      `${P}.subject.reference`,
    ],
    [
      'a bare # (contained id empty)',
      order({ requester: { reference: `#${EMPTY}` } }),
      `${P}.requester.reference`,
    ],
    [
      'urn:uuid: with no uuid',
      order({ requester: { reference: `urn:uuid:${EMPTY}` } }),
      `${P}.requester.reference`,
    ],
    [
      'a reference written without interpolation (Patient/)',
      order({ subject: { reference: 'Patient/' } }),
      `${P}.subject.reference`,
    ],
  ];
  for (const [name, action, field] of bad) {
    it(`drops the suggestion for ${name}, naming the field, and keeps the card`, async () => {
      const card = cardWith([action]);
      card.suggestions = [...(card.suggestions ?? []), { label: 'Keep me', actions: [KEPT] }];
      const compiled = compilePack(pack([{ id: 'bad', service: 'svc', when: 'true', card }, ok]));
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace[0]).to.include({
        ruleId: 'bad',
        status: 'fired',
        fired: true,
        error: `suggestion dropped: ${field}: ${WHY}`,
      });
      expect(result.trace[1]).to.include({ ruleId: 'ok', status: 'fired' });
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['bad', 'ok']);
      expect(result.cards[0]?.suggestions?.map((x) => x.label)).to.deep.equal(['Keep me']);
      const trace = JSON.stringify(result.trace);
      expect(trace).to.not.contain(PLANTED).and.to.not.contain('Xylo');
    });
  }

  it('keeps well-formed references of every form unchanged, in a create and an update', async () => {
    const refs = {
      subject: { reference: 'Patient/{{ %context.patientId }}' },
      basedOn: [
        { reference: `MedicationRequest/${DRAFT_ID}` },
        { reference: `MedicationRequest/${DRAFT_ID}/_history/3` },
        { reference: `https://ehr.example.org/fhir/MedicationRequest/${DRAFT_ID}` },
        { reference: `http://ehr.example.org/fhir/MedicationRequest/${DRAFT_ID}/_history/2` },
        { reference: '#{{ %context.patientId }}' },
        { reference: 'urn:uuid:0f8f3a55-1d2b-4f7e-9f8e-4a6a3c5d7e90' },
        { reference: 'urn:oid:2.16.840.1.113883.4.3' },
        { display: 'a reference with no reference string' },
      ],
      requester: { reference: 'Practitioner/1', display: 'Dr {{ %patient.name.family }}' },
    };
    const compiled = compilePack(
      pack([
        {
          id: 'good',
          service: 'svc',
          when: 'true',
          card: cardWith([order(refs), update({ ...refs, id: DRAFT_ID })]),
        },
      ]),
    );
    const result = await evaluator.evaluate(compiled, 'svc', input('Ab-9.z'));
    expect(result.trace[0]).to.include({ ruleId: 'good', status: 'fired' });
    expect(result.trace[0]).to.not.have.property('error');
    const expected = {
      subject: { reference: 'Patient/p1' },
      basedOn: [
        { reference: 'MedicationRequest/Ab-9.z' },
        { reference: 'MedicationRequest/Ab-9.z/_history/3' },
        { reference: 'https://ehr.example.org/fhir/MedicationRequest/Ab-9.z' },
        { reference: 'http://ehr.example.org/fhir/MedicationRequest/Ab-9.z/_history/2' },
        { reference: '#p1' },
        { reference: 'urn:uuid:0f8f3a55-1d2b-4f7e-9f8e-4a6a3c5d7e90' },
        { reference: 'urn:oid:2.16.840.1.113883.4.3' },
        { display: 'a reference with no reference string' },
      ],
      requester: { reference: 'Practitioner/1', display: 'Dr Xylo' },
    };
    const actions = result.cards[0]?.suggestions?.[0]?.actions;
    expect(actions).to.have.length(2);
    expect(actions?.[0]?.resource).to.deep.include(expected);
    expect(actions?.[1]?.resource).to.deep.include({ ...expected, id: 'Ab-9.z' });
  });

  it("allows a bare # only inside contained (a contained resource's reference to its container, R4 dom-3)", () => {
    const resource = {
      resourceType: 'MedicationRequest',
      contained: [{ resourceType: 'Provenance', target: [{ reference: '#' }] }],
      requester: { reference: '#' },
    };
    expect(findBadReference(resource)).to.equal('.requester.reference');
    expect(findBadReference({ ...resource, requester: { reference: 'Practitioner/1' } })).to.equal(
      undefined,
    );
  });

  it('leaves out a reference that interpolation left wholly empty (as any empty field)', async () => {
    const compiled = compilePack(
      pack([
        {
          id: 'good',
          service: 'svc',
          when: 'true',
          card: cardWith([order({ subject: { reference: EMPTY, display: 'the patient' } })]),
        },
      ]),
    );
    const result = await evaluator.evaluate(compiled, 'svc', input());
    expect(result.trace[0]).to.not.have.property('error');
    const resource = result.cards[0]?.suggestions?.[0]?.actions?.[0]?.resource;
    expect(resource).to.deep.include({ subject: { display: 'the patient' } });
  });

  it('checks it in a worker too', async () => {
    const ev = createEvaluator({ workers: 1, callBudgetMs: 30_000, ruleBudgetMs: 20_000 });
    try {
      const compiled = compilePack(
        pack([
          {
            id: 'bad',
            service: 'svc',
            when: 'true',
            card: cardWith([order({ subject: { reference: `Patient/${DRAFT_ID}` } })]),
          },
          ok,
        ]),
      );
      const result = await ev.evaluate(compiled, 'svc', input());
      expect(result.trace[0]).to.include({
        status: 'fired',
        error: `suggestion dropped: ${P}.subject.reference: ${WHY}`,
      });
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['bad', 'ok']);
      expect(result.cards[0]).to.not.have.property('suggestions');
      expect(result.cards[0]).to.not.have.property('selectionBehavior');
    } finally {
      await ev.close();
    }
  });
});
