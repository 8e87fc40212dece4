import { expect } from 'chai';
import { finalizeCards } from '../../hooks/index.ts';
import {
  answerCards,
  compilePack,
  incompleteEvaluationCard,
  INCOMPLETE_EVALUATION_RULE_ID,
} from '../../rules/index.ts';
import type { RulePack, TraceEntry } from '../../rules/index.ts';

function pack(ruleCount: number): ReturnType<typeof compilePack> {
  const rules = Array.from({ length: ruleCount }, (_, i) => ({
    id: `rule-${i}`,
    service: 'svc',
    ...(i % 2 === 0 ? { title: `Check number ${i}` } : {}),
    when: 'true',
    card: { summary: `card ${i}`, indicator: 'info' as const, source: { label: 'specs' } },
  }));
  const p: RulePack = {
    id: 'incomplete',
    version: '1.0.0',
    title: 'Incomplete pack',
    publisher: 'cellcds specs',
    description: 'Rules for the incomplete-evaluation card.',
    services: [{ id: 'svc', hook: 'patient-view', description: 'A service.' }],
    rules,
  };
  return compilePack(p);
}

const entry = (ruleId: string, status: TraceEntry['status']): TraceEntry => ({
  ruleId,
  status,
  fired: status === 'fired',
  durationMs: 1,
});

describe('incomplete evaluation card', () => {
  it('is absent when every rule ran (fired or not)', () => {
    const trace = [entry('rule-0', 'fired'), entry('rule-1', 'not-fired')];
    expect(incompleteEvaluationCard(pack(2), trace)).to.equal(undefined);
    const result = { cards: [], trace };
    expect(answerCards(pack(2), result)).to.equal(result.cards);
  });

  it('counts and names the rules that errored, timed out or were skipped, by title', () => {
    const trace = [
      entry('rule-0', 'error'),
      entry('rule-1', 'timeout'),
      entry('rule-2', 'skipped'),
      entry('rule-3', 'fired'),
    ];
    const card = incompleteEvaluationCard(pack(4), trace);
    // Rule 3 ran, and the rules that did not could only give info cards: a warning (an info
    // card reads as noise; spec/rules/safety-cards.spec.ts has the critical cases).
    expect(card).to.include({ ruleId: INCOMPLETE_EVALUATION_RULE_ID, indicator: 'warning' });
    expect(card?.summary).to.equal(
      '3 of 4 checks could not run: no card from them does not mean no issue',
    );
    expect(card?.detail).to.contain('- Check number 0 (failed)');
    expect(card?.detail).to.contain('- rule-1 (ran out of time)'); // no title: the id
    expect(card?.detail).to.contain('- Check number 2 (not started before the time ran out)');
    expect(card?.detail).to.not.contain('rule-3');
    expect(card?.source.label).to.equal('Incomplete pack (cellcds specs)');
  });

  it('names ten rules and counts the rest; the card passes the CDS Hooks 2.0 checks', () => {
    const trace = Array.from({ length: 25 }, (_, i) => entry(`rule-${i}`, 'skipped'));
    const compiled = pack(25);
    const [card] = finalizeCards(answerCards(compiled, { cards: [], trace }));
    expect(card?.summary.length).to.be.below(140);
    expect(card?.indicator).to.equal('critical'); // no rule completed
    expect(card?.detail).to.contain('- and 15 more');
    expect(card?.detail?.match(/^- /gm)).to.have.length(11);
    expect(card).to.not.have.property('ruleId');
    expect(card?.uuid).to.be.a('string');
  });

  it('comes after the cards of the rules that ran', () => {
    const compiled = pack(2);
    const fired = {
      ruleId: 'rule-0',
      summary: 'card 0',
      indicator: 'info' as const,
      source: { label: 'specs' },
    };
    const cards = answerCards(compiled, {
      cards: [fired],
      trace: [entry('rule-0', 'fired'), entry('rule-1', 'timeout')],
    });
    expect(cards.map((c) => c.ruleId)).to.deep.equal(['rule-0', INCOMPLETE_EVALUATION_RULE_ID]);
  });
});
