import { expect } from 'chai';
import { Worker } from 'node:worker_threads';
import { compilePack, createEvaluator, UnknownServiceError } from '../../rules/index.ts';
import type {
  ActionTemplate,
  CardTemplate,
  EvaluationInput,
  Evaluator,
  LinkTemplate,
  PackRule,
  RulePack,
} from '../../rules/index.ts';
import { workerBootstrapCode } from '../../rules/evaluator.ts';

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
/** A ten-item collection; nesting `select` over it multiplies: 10^7 items take many seconds. */
const DIGITS = '(0|1|2|3|4|5|6|7|8|9)';
const SLOW = `${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS}.select(${DIGITS})))))).count() > 0`;
/**
 * The same blow-up on the fast path: string literals (which it unions) and a `$this` at the
 * bottom, so no level is a call constant it could compute once. 10^8 items: seconds (10^7 took
 * 240-310 ms on a 2026 machine, too close to the 300 ms rule budget a spec below relies on).
 */
const STRINGS = "('0'|'1'|'2'|'3'|'4'|'5'|'6'|'7'|'8'|'9')";
const SLOW_FAST = `${Array.from({ length: 8 }).reduce<string>((e) => `${STRINGS}.select(${e})`, '$this')}.count() > 0`;
/** A planted patient name: it must never appear in an error message. */
const PLANTED = 'Zebulon';

function rule(id: string, when: string, summary = `card of ${id}`, service = 'svc'): PackRule {
  return { id, service, when, card: { summary, indicator: 'info', source: { label: 'specs' } } };
}

function pack(rules: PackRule[], extra: Partial<RulePack> = {}): RulePack {
  return {
    id: 'evaluator-pack',
    version: '1.0.0',
    title: 'Evaluator pack',
    publisher: 'specs',
    description: 'Evaluator semantics',
    services: [
      { id: 'svc', hook: 'order-select', description: 'main service' },
      { id: 'other', hook: 'patient-view', description: 'other service' },
    ],
    valueSets: {
      warfarin: {
        codes: [
          { system: RXNORM, code: '855332' },
          { system: RXNORM, code: '11289' },
        ],
      },
      nsaids: { codes: [{ system: RXNORM, code: '849574' }] },
    },
    rules,
    ...extra,
  };
}

function input(now = new Date('2024-02-29T10:15:00.000Z')): EvaluationInput {
  return {
    hook: 'order-select',
    hookInstance: '0f8f3a55-1d2b-4f7e-9f8e-4a6a3c5d7e90',
    now,
    context: {
      userId: 'Practitioner/1',
      patientId: 'p1',
      selections: ['MedicationRequest/d1'],
      draftOrders: {
        resourceType: 'Bundle',
        entry: [
          {
            resource: {
              resourceType: 'MedicationRequest',
              id: 'd1',
              status: 'draft',
              medicationCodeableConcept: {
                coding: [{ system: RXNORM, code: '849574', display: 'Naproxen sodium 220 MG' }],
              },
            },
          },
          {
            resource: {
              resourceType: 'MedicationRequest',
              id: 'd2',
              status: 'draft',
              medicationCodeableConcept: {
                coding: [{ system: 'http://example.org/local', code: '855332' }],
              },
            },
          },
        ],
      },
    },
    prefetch: {
      patient: {
        resourceType: 'Patient',
        id: 'p1',
        gender: 'female',
        birthDate: '1950-03-01',
        name: [{ given: [PLANTED, 'Q'], family: 'Xylo' }],
      },
      labs: {
        resourceType: 'Bundle',
        type: 'searchset',
        entry: [
          {
            resource: {
              resourceType: 'Observation',
              id: 'o1',
              effectiveDateTime: '2024-01-10T08:00:00Z',
              valueQuantity: { value: 41.5, unit: 'mL/min/{1.73_m2}' },
            },
          },
          {
            resource: {
              resourceType: 'Observation',
              id: 'o2',
              effectiveDateTime: '2023-06-01T08:00:00Z',
              valueQuantity: { value: 28, unit: 'mL/min' },
            },
          },
        ],
      },
      nothing: null,
    },
  };
}

describe('rules: evaluator', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(() => {
    evaluator = createEvaluator({ workers: 2, ruleBudgetMs: 400, callBudgetMs: 4000 });
  });
  after(async () => {
    await evaluator.close();
  });

  describe('worker startup under tsx', () => {
    it('starts a .ts worker: the bootstrap registers tsx in the worker first', async () => {
      const code = workerBootstrapCode();
      expect(code).to.contain('tsx').and.to.contain('evaluator-worker.ts');
      const worker = new Worker(code, { eval: true });
      try {
        const first = await new Promise<unknown>((resolve, reject) => {
          worker.once('message', resolve);
          worker.once('error', reject);
        });
        expect(first).to.deep.equal({ type: 'ready' });
      } finally {
        await worker.terminate();
      }
    });

    it('evaluates in worker threads with the default options', async () => {
      const ev = createEvaluator();
      try {
        const compiled = compilePack(pack([rule('always', 'true')]));
        const result = await ev.evaluate(compiled, 'svc', input());
        expect(result.trace.map((t) => t.status)).to.deep.equal(['fired']);
        // min(2, cores) workers plus one started spare.
        expect(ev.stats().workersStarted).to.be.within(2, 3);
      } finally {
        await ev.close();
      }
    });
  });

  describe('isolation of rules and the time budget', () => {
    it('keeps the other cards when one rule throws, one is not boolean and one runs too long', async () => {
      const compiled = compilePack(
        pack([
          rule('before', '%selections.count() = 1'),
          rule('thrower', `%context.draftOrders.entry.resource.id contains %patient.name.given`),
          rule('not-boolean', '%patient.name.family'),
          rule('slow', SLOW),
          rule('after', "%patient.gender = 'female'"),
        ]),
      );
      const replacedBefore = evaluator.stats().workersReplaced;
      const t0 = performance.now();
      const result = await evaluator.evaluate(compiled, 'svc', input());
      const elapsed = performance.now() - t0;
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['before', 'after']);
      expect(result.trace.map((t) => [t.ruleId, t.status])).to.deep.equal([
        ['before', 'fired'],
        ['thrower', 'error'],
        ['not-boolean', 'error'],
        ['slow', 'timeout'],
        ['after', 'fired'],
      ]);
      const byId = Object.fromEntries(result.trace.map((t) => [t.ruleId, t]));
      expect(byId.thrower?.error).to.equal('when: Expected singleton on right side of contains');
      expect(byId['not-boolean']?.error).to.equal('when must give a boolean, got string');
      expect(byId.slow?.error).to.equal('exceeded the rule budget of 400 ms');
      expect(byId.slow?.durationMs).to.be.within(390, 1000);
      expect(JSON.stringify(result)).to.not.contain(PLANTED).and.to.not.contain('Xylo');
      expect(evaluator.stats().workersReplaced).to.equal(replacedBefore + 1);
      expect(elapsed).to.be.below(4000);
      expect(result.durationMs).to.be.below(4000);
    });

    it('stops at the call budget: the running rule times out, the rest are skipped', async () => {
      // Budgets with room for compiling the pack inside the call on a loaded CI machine (with
      // 800 / 1400 ms the whole budget went before the first rule once, in a 17-minute suite).
      const ev = createEvaluator({ workers: 1, ruleBudgetMs: 1600, callBudgetMs: 2800 });
      try {
        const compiled = compilePack(
          pack([
            rule('ok', 'true'),
            rule('slow-1', SLOW),
            rule('slow-2', SLOW),
            rule('late', 'true'),
          ]),
        );
        // Let the worker and the spare start so that the budget is spent on rules.
        await ev.ready();
        const t0 = performance.now();
        const result = await ev.evaluate(compiled, 'svc', input());
        const elapsed = performance.now() - t0;
        expect(result.trace.map((t) => [t.ruleId, t.status, t.error])).to.deep.equal([
          ['ok', 'fired', undefined],
          ['slow-1', 'timeout', 'exceeded the rule budget of 1600 ms'],
          ['slow-2', 'timeout', 'call budget exhausted'],
          ['late', 'skipped', 'call budget exhausted'],
        ]);
        expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['ok']);
        // Bounded by the budget, not by the pathological rules; the upper margins allow for a
        // loaded 2-core CI machine (this is not a timing test).
        expect(elapsed).to.be.within(2750, 8000);
        expect(result.trace[1]?.durationMs).to.be.within(1590, 6000);
      } finally {
        await ev.close();
      }
    });

    it('serves concurrent calls from the pool, each with its own result', async () => {
      const compiled = compilePack(
        pack([rule('count', '%selections.count() = 1', 'selected {{ %selections.first().id }}')]),
      );
      const calls = Array.from({ length: 24 }, (_, i) => {
        const inp = input();
        const entries = (inp.context.draftOrders as { entry: Array<{ resource: { id: string } }> })
          .entry;
        entries[0]!.resource.id = `d${i}`;
        entries[1]!.resource.id = 'other';
        inp.context.selections = [`MedicationRequest/d${i}`];
        return evaluator.evaluate(compiled, 'svc', inp);
      });
      const results = await Promise.all(calls);
      results.forEach((r, i) => {
        expect(r.cards.map((c) => c.summary)).to.deep.equal([`selected d${i}`]);
      });
    });
  });

  describe('let values', () => {
    it('computes a let once per call however many rules read it, and only if needed', async () => {
      const compiled = compilePack(
        pack(
          [
            rule('a', '%drafts.count() = 2'),
            rule('b', "%drafts.where(id = 'd1').exists()"),
            rule('c', '%drafts.exists()', 'drafts: {{ %drafts.id }}'),
            rule('other-service', '%unused.exists()', 'x', 'other'),
          ],
          {
            let: {
              drafts: '%draftOrders.entry.resource.ofType(MedicationRequest)',
              unused: '%prefetch.labs.entry.resource',
            },
          },
        ),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace.map((t) => t.status)).to.deep.equal(['fired', 'fired', 'fired']);
      expect(result.lets?.map((l) => [l.name, l.status])).to.deep.equal([['drafts', 'ok']]);
      expect(result.cards[2]?.summary).to.equal('drafts: d1, d2');
    });

    it('lets keep FHIR types: a dateTime from a let compares with %now', async () => {
      const compiled = compilePack(
        pack(
          [
            rule(
              'recent',
              '%latest.effective > %now - 90 days',
              'eGFR {{ %latest.value }} on {{ %latest.effective.toString().substring(0, 10) }}',
            ),
          ],
          {
            let: {
              obs: '%prefetch.labs.entry.resource.ofType(Observation)',
              latest: '%obs.where(effective = %obs.effective.max()).first()',
            },
          },
        ),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace[0]?.status).to.equal('fired');
      expect(result.cards[0]?.summary).to.equal('eGFR 41.5 mL/min/{1.73_m2} on 2024-01-10');
      expect(result.lets?.map((l) => l.name)).to.deep.equal(['obs', 'latest']);
    });

    it('a failing let fails the rules that read it, once, and not the others', async () => {
      const compiled = compilePack(
        pack([rule('r1', '%bad.exists()'), rule('r2', '%bad.empty()'), rule('free', 'true')], {
          let: { bad: '(1|2).single()' },
        }),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace.map((t) => [t.ruleId, t.status, t.error])).to.deep.equal([
        ['r1', 'error', "let 'bad' failed: Expected single"],
        ['r2', 'error', "let 'bad' failed: Expected single"],
        ['free', 'fired', undefined],
      ]);
      expect(result.lets?.map((l) => [l.name, l.status])).to.deep.equal([['bad', 'error']]);
    });

    it('a let that runs too long times out once; its readers fail, the others still run', async () => {
      const compiled = compilePack(
        pack([rule('r1', '%slow'), rule('free', 'true'), rule('r2', '%slow.not()')], {
          let: { slow: SLOW },
        }),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace.map((t) => [t.ruleId, t.status, t.error])).to.deep.equal([
        ['r1', 'timeout', "let 'slow' exceeded the time budget"],
        ['free', 'fired', undefined],
        ['r2', 'error', "let 'slow' failed: exceeded the time budget"],
      ]);
      expect(result.lets?.map((l) => [l.name, l.status])).to.deep.equal([['slow', 'timeout']]);
    });
  });

  describe('expression environment', () => {
    const env: Array<[string, string, string]> = [
      ['%context', "%context.patientId = 'p1'", ''],
      ['%prefetch keys', '%prefetch.labs.entry.count() = 2 and %prefetch.nothing.empty()', ''],
      ['%patient', "%patient.id = 'p1'", ''],
      ['%draftOrders', '%draftOrders.entry.count() = 2', ''],
      [
        '%selections (only the selected drafts)',
        "%selections.count() = 1 and %selections.id = 'd1'",
        '',
      ],
      ['%now (dateTime)', '%now = @2024-02-29T10:15:00.000Z', ''],
      ['%today (date)', '%today = @2024-02-29', ''],
      ['now() pinned to %now', 'now() = %now and today() = %today', ''],
      ['date arithmetic', '%patient.birthDate.toDate() <= %today - 65 years', ''],
      ['a value set as %name', "%warfarin.count() = 2 and %warfarin contains '11289'", ''],
      [
        'inValueSet on a CodeableConcept',
        "%selections.medication.ofType(CodeableConcept).inValueSet('nsaids')",
        '',
      ],
      [
        'inValueSet on a Coding',
        "%selections.medication.ofType(CodeableConcept).coding.inValueSet('nsaids')",
        '',
      ],
      [
        'inValueSet on code strings',
        "%selections.medication.ofType(CodeableConcept).coding.code.inValueSet('nsaids')",
        '',
      ],
      [
        'inValueSet is system-aware',
        "%draftOrders.entry.resource.where(id = 'd2').medication.ofType(CodeableConcept).inValueSet('warfarin').not()",
        '',
      ],
      [
        'inValueSet on nothing is empty',
        "%prefetch.nothing.code.inValueSet('warfarin').empty()",
        '',
      ],
      ['the root is the context', "patientId = 'p1'", ''],
    ];
    for (const [what, when] of env) {
      it(`provides ${what}`, async () => {
        const result = await evaluator.evaluate(
          compilePack(pack([rule('env', when)])),
          'svc',
          input(),
        );
        expect(result.trace[0], JSON.stringify(result.trace[0])).to.include({ status: 'fired' });
      });
    }
  });

  describe('cards', () => {
    it('interpolates card text, links and suggestions', async () => {
      const compiled = compilePack(
        pack([
          {
            id: 'full',
            service: 'svc',
            when: 'true',
            card: {
              summary:
                '{{ %selections.medication.ofType(CodeableConcept).coding }} for {{ %patient.name.given.first() }}',
              detail:
                'Labs: {{ %prefetch.labs.entry.resource.value }}; none: [{{ %prefetch.nothing }}]',
              indicator: 'warning',
              source: { label: 'specs', topic: { system: 'http://example.org', code: 't' } },
              links: [
                {
                  label: 'Open {{ %patient.id }}',
                  url: 'https://app.example.org/p/{{ %patient.id }}',
                  type: 'smart',
                  appContext: '{{ %context.patientId }}',
                },
              ],
              overrideReasons: [
                { system: 'http://example.org', code: 'x', display: 'Not relevant' },
              ],
              selectionBehavior: 'any',
              suggestions: [
                {
                  label: 'Cancel {{ %selections.id }}',
                  isRecommended: true,
                  actions: [
                    {
                      type: 'delete',
                      description: 'Cancel',
                      resourceId: 'MedicationRequest/{{ %selections.id }}',
                    },
                    {
                      type: 'create',
                      description: 'Replace',
                      resource: {
                        resourceType: 'MedicationRequest',
                        status: 'draft',
                        subject: { reference: 'Patient/{{ %patient.id }}' },
                        medicationCodeableConcept: '{{ %selections.medication }}',
                        note: [{ text: '{{ %prefetch.nothing }}' }, { text: 'static' }],
                        dosageInstruction: '{{ %prefetch.nothing }}',
                        extension: [{ valueString: '{{ %prefetch.nothing }}' }],
                      },
                    },
                  ],
                },
              ],
            },
          },
        ]),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.cards).to.deep.equal([
        {
          ruleId: 'full',
          summary: `Naproxen sodium 220 MG for ${PLANTED}`,
          detail: 'Labs: 41.5 mL/min/{1.73_m2}, 28 mL/min; none: []',
          indicator: 'warning',
          source: { label: 'specs', topic: { system: 'http://example.org', code: 't' } },
          links: [
            {
              label: 'Open p1',
              url: 'https://app.example.org/p/p1',
              type: 'smart',
              appContext: 'p1',
            },
          ],
          overrideReasons: [{ system: 'http://example.org', code: 'x', display: 'Not relevant' }],
          selectionBehavior: 'any',
          suggestions: [
            {
              label: 'Cancel d1',
              isRecommended: true,
              actions: [
                { type: 'delete', description: 'Cancel', resourceId: 'MedicationRequest/d1' },
                {
                  type: 'create',
                  description: 'Replace',
                  resource: {
                    resourceType: 'MedicationRequest',
                    status: 'draft',
                    subject: { reference: 'Patient/p1' },
                    medicationCodeableConcept: {
                      coding: [
                        { system: RXNORM, code: '849574', display: 'Naproxen sodium 220 MG' },
                      ],
                    },
                    note: [{ text: 'static' }],
                  },
                },
              ],
            },
          ],
        },
      ]);
    });

    it('a summary of 140+ characters after interpolation is shortened, its card still goes and the trace says so', async () => {
      const compiled = compilePack(
        pack([
          rule(
            'long',
            'true',
            `${'x'.repeat(120)} {{ %patient.name.given }} {{ %patient.name.given }}`,
          ),
          rule('short', 'true'),
        ]),
      );
      const result = await evaluator.evaluate(compiled, 'svc', input());
      // The leading template text stays; the interpolated values are cut to fit, with `…`.
      expect(result.trace[0]).to.include({
        status: 'fired',
        fired: true,
        error:
          'card.summary: 142 characters after interpolation, shortened to 139 (must be under 140)',
      });
      expect(result.trace[0]?.error).to.not.contain(PLANTED);
      expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['long', 'short']);
      expect(result.cards[0]?.summary).to.equal(`${'x'.repeat(120)} ${PLANTED}, Q Zebulo…`);
    });

    describe('a required field that interpolation leaves empty or invalid', () => {
      // `%patient.name.text` is absent in input(): it interpolates to "". The patient's given
      // names (PLANTED) and family name are the PHI an error must never carry.
      const EMPTY = '{{ %patient.name.text }}';
      const card = (patch: Partial<CardTemplate>): CardTemplate => ({
        summary: 'Check this patient',
        indicator: 'warning',
        source: { label: 'specs' },
        ...patch,
      });
      const link = (label: string, url: string): LinkTemplate => ({ label, url, type: 'absolute' });
      const suggestion = (label: string, actions?: ActionTemplate[]): Partial<CardTemplate> => ({
        suggestions: [{ label, ...(actions ? { actions } : {}) }],
      });
      const cases: Array<[string, CardTemplate, string]> = [
        ['summary', card({ summary: EMPTY }), 'card.summary: empty after interpolation (required)'],
        [
          'link label',
          card({ links: [link('Chart', 'https://ehr.example.org'), link(EMPTY, 'https://x.org')] }),
          'card.links[1].label: empty after interpolation (required)',
        ],
        [
          'link url with an empty host',
          card({ links: [link('Chart', `https://${EMPTY}`)] }),
          'card.links[0].url: not an absolute http(s) URL after interpolation',
        ],
        [
          'link url made invalid by patient data',
          card({ links: [link('Chart', 'https://{{ %patient.name.given }}/{{ %patient.id }}')] }),
          'card.links[0].url: not an absolute http(s) URL after interpolation',
        ],
        [
          'suggestion label',
          card(suggestion(EMPTY)),
          'card.suggestions[0].label: empty after interpolation (required)',
        ],
        [
          'action description',
          card(
            suggestion('Stop it', [
              { type: 'delete', description: EMPTY, resourceId: 'MedicationRequest/d1' },
            ]),
          ),
          'card.suggestions[0].actions[0].description: empty after interpolation (required)',
        ],
        [
          'delete resourceId',
          card(
            suggestion('Stop it', [
              { type: 'delete', description: 'Cancel', resourceId: 'MedicationRequest/d1' },
              { type: 'delete', description: 'Cancel', resourceId: EMPTY },
            ]),
          ),
          'card.suggestions[0].actions[1].resourceId: empty after interpolation (required for delete)',
        ],
        [
          'update resource id',
          card(
            suggestion('Lower the dose', [
              {
                type: 'update',
                description: 'Lower the dose',
                resource: { resourceType: 'MedicationRequest', id: EMPTY, status: 'draft' },
              },
            ]),
          ),
          'card.suggestions[0].actions[0].resource.id: empty after interpolation (required for update)',
        ],
      ];
      for (const [name, template, error] of cases) {
        it(`an empty or invalid ${name} is an error naming the field (a suggestion's drops that suggestion), and other rules keep their cards`, async () => {
          const compiled = compilePack(
            pack([{ id: 'bad', service: 'svc', when: 'true', card: template }, rule('ok', 'true')]),
          );
          const result = await evaluator.evaluate(compiled, 'svc', input());
          if (error.startsWith('card.suggestions[')) {
            // Inside a suggestion: only that suggestion is dropped; the card (the alert) goes.
            expect(result.trace[0]).to.include({
              ruleId: 'bad',
              status: 'fired',
              fired: true,
              error: `suggestion dropped: ${error}`,
            });
            expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['bad', 'ok']);
            expect(result.cards[0]).to.not.have.property('suggestions');
          } else {
            expect(result.trace[0]).to.include({
              ruleId: 'bad',
              status: 'error',
              fired: true,
              error,
            });
            expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['ok']);
          }
          expect(result.trace[1]).to.include({ ruleId: 'ok', status: 'fired' });
          const trace = JSON.stringify(result.trace);
          expect(trace).to.not.contain(PLANTED).and.to.not.contain('Xylo');
        });
      }

      it('keeps a card whose optional detail, appContext or create resourceId is empty', async () => {
        const compiled = compilePack(
          pack([
            {
              id: 'optional',
              service: 'svc',
              when: 'true',
              card: card({
                detail: EMPTY,
                links: [
                  {
                    label: 'App',
                    url: 'https://app.example.org',
                    type: 'smart',
                    appContext: EMPTY,
                  },
                ],
                ...suggestion('Order', [
                  {
                    type: 'create',
                    description: 'Create',
                    resourceId: EMPTY,
                    resource: { resourceType: 'Task', status: 'draft', intent: 'order' },
                  },
                ]),
              }),
            },
          ]),
        );
        const result = await evaluator.evaluate(compiled, 'svc', input());
        expect(result.trace[0]).to.include({ status: 'fired' });
        expect(result.cards).to.have.length(1);
        expect(result.cards[0]?.detail).to.equal('');
        expect(result.cards[0]?.links?.[0]?.appContext).to.equal('');
      });
    });

    it('an interpolation of a complex element is an error, named by field', async () => {
      const compiled = compilePack(pack([rule('complex', 'true', 'Labs {{ %prefetch.labs }}')]));
      const result = await evaluator.evaluate(compiled, 'svc', input());
      expect(result.trace[0]?.error).to.equal(
        'card.summary: interpolation returned a complex value; select a primitive element',
      );
      expect(result.cards).to.deep.equal([]);
    });
  });

  describe('calls', () => {
    it('evaluates only the rules of the service asked for', async () => {
      const compiled = compilePack(
        pack([rule('mine', 'true'), rule('theirs', 'true', 'x', 'other')]),
      );
      const result = await evaluator.evaluate(compiled, 'other', {
        ...input(),
        hook: 'patient-view',
      });
      expect(result.trace.map((t) => t.ruleId)).to.deep.equal(['theirs']);
      expect(result.pack).to.deep.equal({
        id: compiled.id,
        version: compiled.version,
        hash: compiled.hash,
      });
      expect(result.service).to.equal('other');
    });

    it('rejects a service the pack does not have', async () => {
      const compiled = compilePack(pack([rule('mine', 'true')]));
      try {
        await evaluator.evaluate(compiled, 'nope', input());
        expect.fail('expected UnknownServiceError');
      } catch (err) {
        expect(err).to.be.instanceOf(UnknownServiceError);
      }
    });

    it('a service without rules answers at once with no cards', async () => {
      const result = await evaluator.evaluate(
        compilePack(pack([rule('mine', 'true')])),
        'other',
        input(),
      );
      expect(result.cards).to.deep.equal([]);
      expect(result.trace).to.deep.equal([]);
    });

    it('the inline evaluator (workers: 0) gives the same cards and does not touch the input', async () => {
      const inline = createEvaluator({ workers: 0 });
      const compiled = compilePack(
        pack([
          rule('a', '%selections.exists()', '{{ %selections.id }} {{ %now }}'),
          rule('b', '%patient.exists()'),
        ]),
      );
      const inp = input();
      const before = JSON.stringify(inp);
      const [x, y] = await Promise.all([
        inline.evaluate(compiled, 'svc', inp),
        evaluator.evaluate(compiled, 'svc', input()),
      ]);
      expect(x.cards).to.deep.equal(y.cards);
      expect(x.cards[0]?.summary).to.equal('d1 2024-02-29T10:15:00.000Z');
      expect(JSON.stringify(inp)).to.equal(before);
      await inline.close();
      try {
        await inline.evaluate(compiled, 'svc', inp);
        expect.fail('expected a closed evaluator to refuse');
      } catch (err) {
        expect((err as Error).message).to.equal('evaluator is closed');
      }
    });

    it('a closed pooled evaluator refuses new calls', async () => {
      const ev = createEvaluator({ workers: 1 });
      await ev.close();
      try {
        await ev.evaluate(compilePack(pack([rule('a', 'true')])), 'svc', input());
        expect.fail('expected a closed evaluator to refuse');
      } catch (err) {
        expect((err as Error).message).to.equal('evaluator is closed');
      }
    });

    it('refuses nonsense budgets', () => {
      expect(() => createEvaluator({ callBudgetMs: 0 })).to.throw(RangeError);
      expect(() => createEvaluator({ workers: -1 })).to.throw(RangeError);
      expect(() => createEvaluator({ inlineSliceMs: -1 })).to.throw(RangeError);
      expect(() => createEvaluator({ inlineSliceMs: Number.NaN })).to.throw(RangeError);
      expect(() => createEvaluator({ inlineRetryMs: -5 })).to.throw(RangeError);
    });
  });

  describe('in the calling thread under a slice (inlineSliceMs, issue 6)', () => {
    const without = (r: { trace: Array<{ durationMs: number }> }) =>
      r.trace.map((t) => ({ ...t, durationMs: 0 }));

    it('evaluates a pack wholly on the fast path in the calling thread, as a worker would', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
      try {
        const compiled = compilePack(
          pack([
            rule('a', '%selections.exists()', '{{ %selections.id }} {{ %now }}'),
            rule('b', "%patient.gender = 'female'"),
            rule('c', '%patient.exists().not()'),
          ]),
        );
        const inp = input();
        const before = JSON.stringify(inp);
        const here = await ev.evaluate(compiled, 'svc', inp);
        const there = await evaluator.evaluate(compiled, 'svc', input());
        expect(here.cards).to.deep.equal(there.cards);
        expect(without(here)).to.deep.equal(without(there));
        expect(here.cards.map((c) => c.summary)).to.deep.equal([
          'd1 2024-02-29T10:15:00.000Z',
          'card of b',
        ]);
        expect(JSON.stringify(inp)).to.equal(before);
        expect(ev.stats()).to.include({ calls: 1, inline: 1, handedOff: 0 });
      } finally {
        await ev.close();
      }
    });

    it('hands a run past its slice to a worker, whose rule budget applies; the calling thread is held about the slice', async () => {
      const ev = createEvaluator({
        workers: 1,
        inlineSliceMs: 20,
        ruleBudgetMs: 300,
        callBudgetMs: 5000,
      });
      try {
        await ev.ready();
        const compiled = compilePack(
          pack([rule('before', '%selections.count() = 1'), rule('slow', SLOW_FAST)]),
        );
        const t0 = performance.now();
        const pending = ev.evaluate(compiled, 'svc', input());
        // evaluate() runs the guarded attempt before it first waits: this is how long the
        // calling thread was held.
        const heldMs = performance.now() - t0;
        const result = await pending;
        expect(heldMs).to.be.below(250);
        expect(result.trace.map((t) => [t.ruleId, t.status])).to.deep.equal([
          ['before', 'fired'],
          ['slow', 'timeout'],
        ]);
        expect(result.cards.map((c) => c.ruleId)).to.deep.equal(['before']);
        expect(ev.stats()).to.include({ calls: 1, inline: 0, handedOff: 1, workersReplaced: 1 });
      } finally {
        await ev.close();
      }
    });

    it('keeps a pack with an expression outside the fast path in the workers', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
      try {
        // matches() is not on the fast path: the pack is never tried in the calling thread.
        const compiled = compilePack(pack([rule('m', "%patient.gender.matches('^fem')")]));
        const result = await ev.evaluate(compiled, 'svc', input());
        expect(result.trace.map((t) => t.status)).to.deep.equal(['fired']);
        expect(ev.stats()).to.include({ calls: 1, inline: 0, handedOff: 0 });
      } finally {
        await ev.close();
      }
    });

    it('hands off a call the fast path declines at run time (fhirpath.js never runs here), with the same result', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
      try {
        // Equality of two objects (names) is left to fhirpath.js at run time; it comes after
        // a rule that has fired already, whose result is dropped with the attempt.
        const compiled = compilePack(
          pack([
            rule('first', '%selections.exists()'),
            rule('names', '%patient.name.first() = %patient.name.first()'),
          ]),
        );
        const here = await ev.evaluate(compiled, 'svc', input());
        const there = await evaluator.evaluate(compiled, 'svc', input());
        expect(without(here)).to.deep.equal(without(there));
        expect(here.cards).to.deep.equal(there.cards);
        expect(here.trace.map((t) => t.status)).to.deep.equal(['fired', 'fired']);
        expect(ev.stats()).to.include({ calls: 1, inline: 0, handedOff: 1 });
      } finally {
        await ev.close();
      }
    });

    it('pauses a pack that keeps handing off, then tries it again afresh', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000, inlineRetryMs: 300 });
      try {
        const compiled = compilePack(
          pack([rule('names', '%patient.name.first() = %patient.name.first()')]),
        );
        for (let i = 0; i < 25; i++) {
          const r = await ev.evaluate(compiled, 'svc', input());
          expect(r.trace.map((t) => t.status)).to.deep.equal(['fired']);
        }
        // Ten hand-offs in ten tries: the pack goes to the workers for the pause.
        expect(ev.stats()).to.include({ calls: 25, inline: 0, handedOff: 10 });
        await new Promise((resolve) => setTimeout(resolve, 350));
        await ev.evaluate(compiled, 'svc', input());
        // Tried again after the pause (and handed off again: the input has not changed).
        expect(ev.stats()).to.include({ calls: 26, inline: 0, handedOff: 11 });
      } finally {
        await ev.close();
      }
    });

    // Packs are shared by tenants: one tenant whose inputs keep handing off must not take the
    // pack off the main thread for the others.
    it("pauses a pack for the scope (tenant) whose calls hand off, not for another's", async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000, inlineRetryMs: 60_000 });
      try {
        const compiled = compilePack(
          pack([rule('names', '%patient.name.first() = %patient.name.first()')]),
        );
        // Object equality (names) is left to fhirpath.js: tenant A's calls hand off.
        for (let i = 0; i < 10; i++) {
          await ev.evaluate(compiled, 'svc', input(), { scope: 'tenant-a' });
        }
        expect(ev.stats()).to.include({ calls: 10, inline: 0, handedOff: 10 });
        // A patient without names: nothing to compare, the fast path answers in this thread.
        const nameless = input();
        const patient = { ...(nameless.prefetch.patient as Record<string, unknown>) };
        delete patient.name;
        nameless.prefetch = { ...nameless.prefetch, patient };
        const b = await ev.evaluate(compiled, 'svc', nameless, { scope: 'tenant-b' });
        expect(ev.stats()).to.include({ calls: 11, inline: 1, handedOff: 10 });
        // Tenant A is paused: its call goes straight to a worker, not tried (no hand-off).
        const a = await ev.evaluate(compiled, 'svc', nameless, { scope: 'tenant-a' });
        expect(ev.stats()).to.include({ calls: 12, inline: 1, handedOff: 10 });
        expect(without(a)).to.deep.equal(without(b));
      } finally {
        await ev.close();
      }
    });
  });
});
