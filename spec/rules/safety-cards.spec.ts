/**
 * The engine must not lose a safety card silently (patient-safety review, four findings): a
 * long interpolated summary is shortened, not fatal; the "checks could not run" card is a
 * warning or critical; a pack test fails on a rule that errors; a rule whose condition can
 * never be true is refused. Real FHIRPath through the real evaluator.
 */
import { expect } from 'chai';
import { finalizeCards } from '../../hooks/index.ts';
import {
  answerCards,
  compilePack,
  createEvaluator,
  evaluateInline,
  incompleteEvaluationCard,
  INCOMPLETE_EVALUATION_RULE_ID,
  PackValidationError,
  runPackTests,
  validatePack,
} from '../../rules/index.ts';
import type {
  EvaluationInput,
  Evaluator,
  PackRule,
  RulePack,
  TraceEntry,
} from '../../rules/index.ts';
import {
  ALWAYS,
  RECENT_MEDS,
  SAFETY_SERVICE,
  safetyPack,
  safetyRequest,
  WARFARIN_NSAID,
} from '../helpers/safety-pack.ts';

const NOW = new Date('2024-03-01T10:00:00Z');
/** A 150-character display text (an EHR's long free-text product name). */
const LONG_NAME =
  `Ibuprofen 200 MG Oral Tablet ${'[extended release, store below 25 C] '.repeat(4)}`
    .padEnd(150, 'x')
    .slice(0, 150);

/** The summary's length with LONG_NAME filled in. */
const FULL_LENGTH = 'Warfarin + '.length + 150 + ': increased risk of bleeding'.length;

function input(draftDisplay?: string, secondMed = false): EvaluationInput {
  return { ...safetyRequest(draftDisplay, secondMed), now: NOW };
}

async function expectProblems(raw: unknown): Promise<Array<{ path: string; message: string }>> {
  try {
    await validatePack(raw, { runTests: false });
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  throw new Error('expected the pack to be refused');
}

describe('rules: no safety card is lost silently', function () {
  this.timeout(60_000);
  let evaluator: Evaluator;
  before(() => {
    evaluator = createEvaluator({ workers: 1 });
  });
  after(async () => {
    await evaluator.close();
  });

  describe('a summary longer than 140 characters after interpolation', () => {
    it('is shortened in the interpolated value, keeping the template text; the critical card and its suggestion still go', async () => {
      expect(LONG_NAME).to.have.length(150);
      const compiled = compilePack(safetyPack());
      for (const result of [
        evaluateInline(compiled, SAFETY_SERVICE, input(LONG_NAME)),
        await evaluator.evaluate(compiled, SAFETY_SERVICE, input(LONG_NAME)),
      ]) {
        const card = result.cards.find((c) => c.ruleId === 'warfarin-nsaid');
        expect(card, JSON.stringify(result.trace)).to.not.equal(undefined);
        expect(card?.indicator).to.equal('critical');
        const summary = card?.summary ?? '';
        expect(summary.length).to.equal(139);
        expect(summary.startsWith(`Warfarin + ${LONG_NAME.slice(0, 40)}`)).to.equal(true);
        expect(summary.endsWith('…: increased risk of bleeding')).to.equal(true);
        expect(card?.suggestions?.map((s) => s.label)).to.deep.equal([
          'Replace with acetaminophen',
        ]);
        // The trace says so, with lengths only (the value is patient data).
        expect(result.trace[0]).to.deep.include({
          ruleId: 'warfarin-nsaid',
          status: 'fired',
          fired: true,
          error: `card.summary: ${FULL_LENGTH} characters after interpolation, shortened to 139 (must be under 140)`,
        });
        expect(result.trace[0]?.error).to.not.contain('Ibuprofen');
        // No "checks could not run" card: every rule completed.
        expect(answerCards(compiled, result).map((c) => c.ruleId)).to.deep.equal([
          'warfarin-nsaid',
          'always',
        ]);
        // And the card passes the CDS Hooks 2.0 backstop.
        expect(finalizeCards(result.cards).map((c) => c.summary.length)).to.deep.equal([
          139,
          'Order checks ran'.length,
        ]);
      }
    });

    it('leaves a summary under the limit as it is, and adds nothing to the trace', () => {
      const compiled = compilePack(safetyPack());
      const result = evaluateInline(compiled, SAFETY_SERVICE, input());
      expect(result.cards[0]?.summary).to.equal(
        'Warfarin + Ibuprofen 200 MG Oral Tablet: increased risk of bleeding',
      );
      expect(result.trace[0]).to.not.have.property('error');
    });

    it('never cuts a surrogate pair in two', () => {
      // 😀 is two UTF-16 code units; the cut falls between them at every offset of the name.
      for (const offset of [0, 1]) {
        const name = `${'a'.repeat(offset)}${'😀'.repeat(80)}`;
        const compiled = compilePack(safetyPack());
        const card = evaluateInline(compiled, SAFETY_SERVICE, input(name)).cards[0];
        const summary = card?.summary ?? '';
        expect(summary.length).to.be.at.most(139);
        expect(summary.endsWith('…: increased risk of bleeding')).to.equal(true);
        // No lone surrogate: the text survives a UTF-8 round trip unchanged.
        expect(Buffer.from(summary, 'utf8').toString('utf8')).to.equal(summary);
        expect(
          /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(summary),
        ).to.equal(false);
      }
    });

    it('cuts at the end when the template ends with an interpolation', () => {
      const rule: PackRule = {
        ...WARFARIN_NSAID,
        card: {
          ...WARFARIN_NSAID.card,
          summary: `Bleeding risk: warfarin + {{ %draftOrders.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).text }}`,
        },
      };
      const compiled = compilePack(safetyPack([rule]));
      const card = evaluateInline(compiled, SAFETY_SERVICE, input(LONG_NAME)).cards[0];
      expect(card?.summary).to.equal(
        `Bleeding risk: warfarin + ${LONG_NAME.slice(0, 139 - 'Bleeding risk: warfarin + '.length - 1).trimEnd()}…`,
      );
    });

    it('a literal summary of 140 characters is still refused by pack validation', async () => {
      const rule: PackRule = { ...ALWAYS, card: { ...ALWAYS.card, summary: 'x'.repeat(140) } };
      expect(await expectProblems(safetyPack([rule]))).to.deep.equal([
        { path: 'rules[0].card.summary', message: 'must be under 140 characters (got 140)' },
      ]);
    });
  });

  describe('the "checks could not run" card', () => {
    it('is critical when a rule that did not complete gives a critical card', () => {
      // warfarin-nsaid (critical) fails on a collection where it needs one item.
      const rule: PackRule = {
        ...WARFARIN_NSAID,
        when: `${WARFARIN_NSAID.when} and %prefetch.meds.entry.resource.ofType(MedicationRequest).authoredOn > @2000-01-01`,
      };
      const compiled = compilePack(safetyPack([rule, ALWAYS]));
      const result = evaluateInline(compiled, SAFETY_SERVICE, input(undefined, true));
      expect(result.trace.map((t) => t.status)).to.deep.equal(['error', 'fired']);
      const cards = answerCards(compiled, result);
      expect(cards.map((c) => [c.ruleId, c.indicator])).to.deep.equal([
        ['always', 'info'],
        [INCOMPLETE_EVALUATION_RULE_ID, 'critical'],
      ]);
      expect(cards[1]?.summary).to.equal(
        '1 of 2 checks could not run: no card from them does not mean no issue',
      );
    });

    it('is a warning when only rules with warning or info cards did not complete', () => {
      const compiled = compilePack(safetyPack([WARFARIN_NSAID, RECENT_MEDS, ALWAYS]));
      const result = evaluateInline(compiled, SAFETY_SERVICE, input(undefined, true));
      expect(result.trace.map((t) => t.status)).to.deep.equal(['fired', 'error', 'fired']);
      const cards = answerCards(compiled, result);
      expect(cards.map((c) => [c.ruleId, c.indicator])).to.deep.equal([
        ['warfarin-nsaid', 'critical'],
        ['always', 'info'],
        [INCOMPLETE_EVALUATION_RULE_ID, 'warning'],
      ]);
    });

    it('is critical when no rule completed (the call budget ran out), whatever their cards', async () => {
      const info: PackRule = { ...RECENT_MEDS, card: { ...RECENT_MEDS.card, indicator: 'info' } };
      const compiled = compilePack(safetyPack([info, ALWAYS]));
      // Every rule skipped: what a call whose budget is spent before its first rule gets.
      const trace: TraceEntry[] = ['recent-meds', 'always'].map((ruleId) => ({
        ruleId,
        status: 'skipped',
        fired: false,
        durationMs: 0,
      }));
      const card = incompleteEvaluationCard(compiled, trace);
      expect(card?.indicator).to.equal('critical');
      expect(card?.summary).to.equal(
        '2 of 2 checks could not run: no card from them does not mean no issue',
      );
      // Through the evaluator: every rule failed (two prescriptions) is "none completed" too.
      const failing: PackRule = { ...ALWAYS, when: RECENT_MEDS.when };
      const both = compilePack(safetyPack([info, failing]));
      const result = await evaluator.evaluate(both, SAFETY_SERVICE, input(undefined, true));
      expect(result.trace.map((t) => t.status)).to.deep.equal(['error', 'error']);
      expect(incompleteEvaluationCard(both, result.trace)?.indicator).to.equal('critical');
    });

    it('is critical for a rule the pack does not know (conservatively)', () => {
      const compiled = compilePack(safetyPack([ALWAYS, RECENT_MEDS]));
      const card = incompleteEvaluationCard(compiled, [
        { ruleId: 'always', status: 'fired', fired: true, durationMs: 1 },
        { ruleId: 'gone', status: 'error', fired: false, durationMs: 0, error: 'unknown rule' },
      ]);
      expect(card?.indicator).to.equal('critical');
    });
  });

  describe('pack tests and a rule that errors', () => {
    const test = (name: string, secondMed: boolean, expectation: RulePack['tests']) => {
      const request = safetyRequest(undefined, secondMed);
      return (expectation ?? []).map((t) => ({ ...t, name, request }));
    };

    it('fail the test case in which a rule no expectation names errors, naming the rule and its error', async () => {
      const pack = safetyPack([WARFARIN_NSAID, RECENT_MEDS]);
      pack.tests = [
        ...test('one prescription', false, [
          { name: '', service: SAFETY_SERVICE, expect: { fire: ['warfarin-nsaid'] } },
        ]),
        ...test('two prescriptions', true, [
          { name: '', service: SAFETY_SERVICE, expect: { fire: ['warfarin-nsaid'] } },
        ]),
      ];
      const results = await runPackTests(compilePack(pack), evaluator);
      expect(results.map((r) => [r.name, r.passed])).to.deep.equal([
        ['one prescription', true],
        ['two prescriptions', false],
      ]);
      expect(results[1]?.failures).to.have.length(1);
      expect(results[1]?.failures[0]).to.match(/^rule recent-meds: error \(when: /);
      // validatePack (pack test, pack push, uploads) refuses the pack with it.
      try {
        await validatePack(pack, { evaluator });
        expect.fail('the pack was accepted');
      } catch (err) {
        expect(err).to.be.instanceOf(PackValidationError);
        const problems = (err as PackValidationError).problems;
        expect(problems).to.have.length(1);
        expect(problems[0]?.path).to.equal('tests[1]');
        expect(problems[0]?.message).to.contain('rule recent-meds: error (when: ');
      }
    });

    it('names the rule once when an expectation already names it', async () => {
      const pack = safetyPack([WARFARIN_NSAID, RECENT_MEDS]);
      pack.tests = test('two prescriptions', true, [
        { name: '', service: SAFETY_SERVICE, expect: { notFire: ['recent-meds'] } },
      ]);
      const [result] = await runPackTests(compilePack(pack), evaluator);
      expect(result?.passed).to.equal(false);
      expect(result?.failures).to.have.length(1);
      expect(result?.failures[0]).to.match(/^expected rule recent-meds not to fire \(error: /);
    });
  });

  describe('a rule whose condition can never be true', () => {
    const refused: Array<[string, string]> = [
      ['false', 'false'],
      ['(false)', 'false'],
      ['{}', 'empty'],
      ['1 = 2', 'false'],
      ["'a' = 'b'", 'false'],
      ['true.not()', 'false'],
      ['1 > 2 or false', 'false'],
      ['false and %prefetch.meds.entry.exists()', 'false'],
      ['%prefetch.meds.entry.exists() and {}', 'empty or false'],
    ];
    for (const [when, result] of refused) {
      it(`is refused: when '${when}'`, async () => {
        const rule: PackRule = { ...ALWAYS, id: 'switched-off', when };
        expect(await expectProblems(safetyPack([WARFARIN_NSAID, rule]))).to.deep.equal([
          {
            path: 'rules[1].when',
            message: `rule 'switched-off' can never fire: its condition is always ${result}`,
          },
        ]);
      });
    }

    const accepted = [
      'true',
      '1 = 1',
      '%prefetch.meds.entry.exists()',
      'false or %prefetch.meds.entry.exists()',
      "%context.patientId = 'x'",
      '1 / 0 = 1 or %prefetch.meds.entry.exists()',
    ];
    for (const when of accepted) {
      it(`is not refused when it may be true: when '${when}'`, async () => {
        const rule: PackRule = { ...ALWAYS, id: 'maybe', when };
        const compiled = await validatePack(safetyPack([rule]), { runTests: false });
        expect(compiled.pack.rules[0]?.when).to.equal(when);
      });
    }
  });
});
