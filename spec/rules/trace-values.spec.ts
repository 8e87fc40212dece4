import { expect } from 'chai';
import fhirpath from 'fhirpath';
import r4 from 'fhirpath/fhir-context/r4';
import { compilePack, createEvaluator, evaluateInline } from '../../rules/index.ts';
import type { EvaluationInput, EvaluationResult } from '../../rules/index.ts';
import { splitTopLevelAnd, summarizeValue } from '../../rules/trace-values.ts';

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

describe('trace value summaries (author tools)', () => {
  it('counts an empty collection', () => {
    expect(summarizeValue([])).to.equal('0 items');
  });

  it('renders a resource as Type/id with its first coding', () => {
    const med = {
      resourceType: 'MedicationRequest',
      id: 'x',
      medicationCodeableConcept: {
        coding: [
          { system: RXNORM, code: '1234' },
          { system: 'http://other', code: '9' },
        ],
      },
    };
    expect(summarizeValue([med])).to.equal(`1 item: MedicationRequest/x ${RXNORM}|1234`);
    expect(summarizeValue([{ resourceType: 'Patient', id: 'p' }])).to.equal('1 item: Patient/p');
  });

  it('renders primitives as they are', () => {
    expect(summarizeValue([true])).to.equal('1 item: true');
    expect(summarizeValue([3, 'a b'])).to.equal("2 items: 3, 'a b'");
  });

  it('renders codings, codeable concepts and quantities compactly', () => {
    expect(summarizeValue([{ system: 's', code: 'c', display: 'D' }])).to.equal('1 item: s|c');
    expect(summarizeValue([{ coding: [{ system: 's', code: 'c' }], text: 't' }])).to.equal(
      '1 item: s|c',
    );
    expect(summarizeValue([{ value: 5, unit: 'mg' }])).to.equal('1 item: 5 mg');
  });

  it('shows the first few items and the count of all', () => {
    const items = Array.from({ length: 10 }, (_, i) => ({
      resourceType: 'Condition',
      id: `c${i}`,
    }));
    const s = summarizeValue(items);
    expect(s.startsWith('10 items: Condition/c0, Condition/c1, Condition/c2')).to.equal(true);
    expect(s).to.match(/, …$/);
  });

  it('truncates to 120 characters', () => {
    const s = summarizeValue(['x'.repeat(500)]);
    expect(s.length).to.equal(120);
    expect(s.endsWith('…')).to.equal(true);
  });

  it('unwraps fhirpath.js internal values (resource nodes, dates) of raw let values', () => {
    const res = {
      resourceType: 'Observation',
      id: 'o',
      code: { coding: [{ system: 'l', code: '1' }] },
    };
    const raw = fhirpath.evaluate(res, 'Observation | %d', { d: '2020-01-02' }, r4, {
      resolveInternalTypes: false,
    }) as unknown[];
    expect(summarizeValue(raw)).to.equal("2 items: Observation/o l|1, '2020-01-02'");
    const date = fhirpath.evaluate({}, '@2020-01-02', {}, r4, {
      resolveInternalTypes: false,
    }) as unknown[];
    expect(summarizeValue(date)).to.equal('1 item: 2020-01-02');
  });

  it('splits a when into its top-level and-operands only', () => {
    expect(
      splitTopLevelAnd("%a.exists() and %b.where(x = 'and' and y).empty() and %c"),
    ).to.deep.equal(['%a.exists()', "%b.where(x = 'and' and y).empty()", '%c']);
    expect(splitTopLevelAnd('%a\n  and\n%brand')).to.deep.equal(['%a', '%brand']);
    // `or`, `xor` and `implies` bind looser than `and`: no split.
    expect(splitTopLevelAnd('%a and %b or %c')).to.equal(undefined);
    expect(splitTopLevelAnd('%a.exists()')).to.equal(undefined);
    expect(splitTopLevelAnd("%a and `and` = 'x'")).to.deep.equal(['%a', "`and` = 'x'"]);
  });
});

describe('traceValues: values only when an author tool asks', () => {
  const pack = compilePack({
    id: 'typo',
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'sign', hook: 'order-sign', description: 'd' }],
    valueSets: { erLa: { codes: [{ system: 'http://hl7.org/fhir/sid/ndc', code: '1234' }] } },
    let: {
      draftMeds: '%draftOrders.entry.resource.ofType(MedicationRequest)',
      erLaDrafts: "%draftMeds.where(medication.ofType(CodeableConcept).inValueSet('erLa'))",
    },
    rules: [
      {
        id: 'er-la',
        service: 'sign',
        when: '%draftMeds.exists() and %erLaDrafts.exists()',
        card: { summary: 's', indicator: 'warning', source: { label: 'x' } },
      },
    ],
  });
  const input = (): EvaluationInput => ({
    hook: 'order-sign',
    hookInstance: 'h',
    context: {
      patientId: 'p',
      userId: 'Practitioner/u',
      draftOrders: {
        resourceType: 'Bundle',
        type: 'collection',
        entry: [
          {
            resource: {
              resourceType: 'MedicationRequest',
              id: 'x',
              medicationCodeableConcept: { coding: [{ system: RXNORM, code: '1234' }] },
            },
          },
        ],
      },
    },
    prefetch: {},
    now: new Date('2021-03-01T12:00:00Z'),
  });
  const firstFalse = { operand: 2, of: 2, expression: '%erLaDrafts.exists()', result: 'false' };

  function expectValues(result: EvaluationResult): void {
    expect(result.lets?.map((l) => [l.name, l.value])).to.deep.equal([
      ['draftMeds', `1 item: MedicationRequest/x ${RXNORM}|1234`],
      ['erLaDrafts', '0 items'],
    ]);
    expect(result.trace[0]?.firstFalse).to.deep.equal(firstFalse);
  }

  function expectNoValues(result: EvaluationResult): void {
    expect(result.trace[0]?.status).to.equal('not-fired');
    expect(result.lets?.length).to.equal(2);
    expect(JSON.stringify(result)).to.not.include('1234');
    expect(result.trace[0]).to.not.have.property('firstFalse');
  }

  it('evaluateInline', () => {
    expectNoValues(evaluateInline(pack, 'sign', input()));
    expectValues(evaluateInline(pack, 'sign', input(), undefined, { traceValues: true }));
  });

  for (const [name, opts] of [
    ['a worker (main-thread slice on)', { workers: 1, inlineSliceMs: 50 }],
    ['the inline evaluator', { workers: 0 }],
  ] as const) {
    it(`evaluate on ${name}`, async () => {
      const evaluator = createEvaluator(opts);
      try {
        await evaluator.ready();
        expectNoValues(await evaluator.evaluate(pack, 'sign', input()));
        expectValues(await evaluator.evaluate(pack, 'sign', input(), { traceValues: true }));
      } finally {
        await evaluator.close();
      }
    });
  }
});
