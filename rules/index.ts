export type * from './types.ts';
export * from './errors.ts';
export * from './patient-bundle.ts';
export * from './prefetch-template.ts';
export * from './plan-definition.ts';
export { parsePackText, packHash, packToJson, packToYaml, canonicalJson } from './pack-format.ts';
export { validatePack } from './validate-pack.ts';
export { ID_PATTERN, nowProblem, nowText, parseNow } from './pack-schema.ts';
export {
  findBadReference,
  isAbsoluteHttpUrl,
  isFhirReference,
  shortenSummary,
  SUMMARY_LIMIT,
} from './evaluate-core.ts';
export {
  answerCards,
  incompleteEvaluationCard,
  INCOMPLETE_EVALUATION_RULE_ID,
} from './incomplete-evaluation.ts';
export type { ValidatePackOptions } from './validate-pack.ts';
export { PACK_CHECK_DEFAULTS, validatePackInWorker } from './pack-check.ts';
export type { PackCheckInput, PackCheckOptions } from './pack-check.ts';
export {
  compilePack,
  compilePackInSlices,
  FHIR_ID,
  RELATIVE_REFERENCE,
  threadCompileCounts,
} from './compile-pack.ts';
export { createEvaluator, evaluateInline } from './evaluator.ts';
export type {
  EvaluateOptions,
  Evaluator,
  EvaluatorBudgets,
  EvaluatorOptions,
  EvaluatorStats,
} from './evaluator.ts';
export { chooseVersion, canaryBucket } from './canary.ts';
export {
  evaluationMsOf,
  LIVE_BUDGET_RUNS,
  runPackTests,
  resolvePackFiles,
  testInput,
  uncoveredRules,
} from './pack-tests.ts';
export type { PackTestResult, RunPackTestsOptions } from './pack-tests.ts';
