/**
 * Section 2, the rule engine: per-call evaluation time of the shipped pack over every Synthea
 * patient (order-sign with an NSAID draft, and patient-view, each at the patient's last
 * encounter), for the cellcds engine, for compiled fhirpath.js applied rule by rule without
 * sharing, and for hand-written JavaScript of three rules (the floor). Fails if the engine's
 * fired set differs from fhirpath.js on any call, or from the hand-written rules.
 */
import { createEvaluator, evaluateInline } from '../rules/index.ts';
import type { CompiledPack } from '../rules/index.ts';
// The engine without its fast path, for comparison: internals, on purpose (a bench, not a client).
import { compileProgram } from '../rules/compile-pack.ts';
import { runRules } from '../rules/evaluate-core.ts';
import type { BenchPatient, EngineCall } from './fixtures.ts';
import { engineCalls } from './fixtures.ts';
import { handWrittenRules, RuleByRuleFhirpath } from './reference.ts';
import { BenchFailure, timeRounds } from './util.ts';

export interface EngineResult {
  patients: number;
  calls: number;
  /** Evaluation time per call (µs of CPU, median of alternating rounds). */
  engineUs: number;
  fhirpathUs: number;
  /** fhirpath.js rule by rule ÷ engine: how many times faster the engine is. */
  speedupVsFhirpath: number;
  /** The engine with every expression on fhirpath.js (lets still shared, no fast path). */
  engineNoFastPathUs: number;
  /** The same, per hook. */
  byHook: Record<string, { engineUs: number; fhirpathUs: number; speedup: number }>;
  /** The three hand-written rules: engine (those rules only) vs plain JavaScript. */
  floorRules: readonly string[];
  engineThreeUs: number;
  handUs: number;
  /** engine (three rules) ÷ hand-written: how far the engine is above the floor. */
  engineOverFloor: number;
  /** One call through the worker pool (createEvaluator defaults), sequential (µs). */
  evaluatorUs: number;
  /** Calls on which the engine fired at least one rule, and rules fired in all. */
  callsWithCards: number;
  rulesFired: number;
}

function firedOf(pack: CompiledPack, call: EngineCall, ruleIds?: readonly string[]) {
  return evaluateInline(pack, call.serviceId, call.input, ruleIds);
}

/** Runs the section. `minMs` is the measuring time of each variant. */
export async function runEngineSection(
  pack: CompiledPack,
  patients: readonly BenchPatient[],
  minMs: number,
): Promise<EngineResult> {
  const calls = engineCalls(pack.pack, patients);
  const reference = new RuleByRuleFhirpath(pack.pack);
  const hand = handWrittenRules(pack.pack);

  // Correctness first: identical fired sets on every call, identical floor summaries.
  let callsWithCards = 0;
  let rulesFired = 0;
  for (const call of calls) {
    const result = firedOf(pack, call);
    const errors = result.trace.filter((t) => t.status !== 'fired' && t.status !== 'not-fired');
    if (errors.length > 0) {
      throw new BenchFailure(
        `engine: ${call.patient} ${call.hook}: rule ${errors[0]?.ruleId ?? ''} ${errors[0]?.status ?? ''}`,
      );
    }
    const engineFired = result.trace.filter((t) => t.fired).map((t) => t.ruleId);
    const refFired = reference.fired(call.input, call.ruleIds);
    if (engineFired.join(',') !== refFired.join(',')) {
      throw new BenchFailure(
        `engine differs from fhirpath.js for ${call.patient} ${call.hook}: engine [${engineFired.join(', ')}], fhirpath.js [${refFired.join(', ')}]`,
      );
    }
    const handOut = hand.run(call.input);
    for (const id of hand.ruleIds.filter((r) => call.ruleIds.includes(r))) {
      const card = result.cards.find((c) => c.ruleId === id);
      if ((card?.summary ?? '') !== (handOut.get(id) ?? '')) {
        throw new BenchFailure(
          `engine differs from the hand-written ${id} for ${call.patient}: ${JSON.stringify(card?.summary)} vs ${JSON.stringify(handOut.get(id))}`,
        );
      }
    }
    rulesFired += engineFired.length;
    callsWithCards += engineFired.length > 0 ? 1 : 0;
  }

  // CPU time per call, in alternating rounds; the median of each variant.
  const sign = calls.filter((c) => c.hook === 'order-sign');
  const view = calls.filter((c) => c.hook === 'patient-view');
  const three = calls.map((c) => ({
    call: c,
    ids: hand.ruleIds.filter((r) => c.ruleIds.includes(r)),
  }));
  const engineOf = (list: readonly EngineCall[]) => () => {
    for (const call of list) {
      firedOf(pack, call);
    }
  };
  const fhirpathOf = (list: readonly EngineCall[]) => () => {
    for (const call of list) {
      reference.fired(call.input, call.ruleIds);
    }
  };
  const slowProgram = compileProgram(pack.pack, `${pack.hash}:no-fast-path`, { fastPath: false });
  const rounds = minMs >= 1000 ? 7 : 3;
  const perRound = Math.max(10, minMs / rounds);
  const t = timeRounds(
    {
      engine: engineOf(calls),
      fhirpath: fhirpathOf(calls),
      engineSign: engineOf(sign),
      fhirpathSign: fhirpathOf(sign),
      engineView: engineOf(view),
      fhirpathView: fhirpathOf(view),
      engineNoFast: () => {
        for (const call of calls) {
          runRules(slowProgram, call.input, call.ruleIds, { onRule: () => undefined });
        }
      },
      engineThree: () => {
        for (const { call, ids } of three) {
          firedOf(pack, call, ids);
        }
      },
      hand: () => {
        for (const call of calls) {
          hand.run(call.input);
        }
      },
    },
    rounds,
    perRound,
  );
  const us = (ms: number | undefined, n: number) => ((ms ?? Number.NaN) * 1000) / n;
  const engineUs = us(t.engine, calls.length);
  const fhirpathUs = us(t.fhirpath, calls.length);
  const byHook: EngineResult['byHook'] = {};
  for (const [hook, e, f, n] of [
    ['order-sign', t.engineSign, t.fhirpathSign, sign.length],
    ['patient-view', t.engineView, t.fhirpathView, view.length],
  ] as const) {
    byHook[hook] = { engineUs: us(e, n), fhirpathUs: us(f, n), speedup: us(f, n) / us(e, n) };
  }
  const engineThreeUs = us(t.engineThree, calls.length);
  const engineNoFastPathUs = us(t.engineNoFast, calls.length);
  const handUs = us(t.hand, calls.length);

  // Through the worker pool, one call at a time: the thread hop and message costs included.
  const evaluator = createEvaluator();
  let evaluatorUs = 0;
  try {
    await evaluator.ready();
    for (const call of calls.slice(0, 4)) {
      await evaluator.evaluate(pack, call.serviceId, call.input);
    }
    const started = performance.now();
    let n = 0;
    while (performance.now() - started < minMs || n < calls.length) {
      const call = calls[n % calls.length] as EngineCall;
      await evaluator.evaluate(pack, call.serviceId, call.input);
      n++;
    }
    evaluatorUs = ((performance.now() - started) * 1000) / n;
  } finally {
    await evaluator.close();
  }

  return {
    patients: patients.length,
    calls: calls.length,
    engineUs,
    fhirpathUs,
    speedupVsFhirpath: fhirpathUs / engineUs,
    engineNoFastPathUs,
    byHook,
    floorRules: hand.ruleIds,
    engineThreeUs,
    handUs,
    engineOverFloor: engineThreeUs / handUs,
    evaluatorUs,
    callsWithCards,
    rulesFired,
  };
}
