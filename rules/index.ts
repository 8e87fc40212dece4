export type * from './types.ts';
export * from './errors.ts';
export * from './patient-bundle.ts';
export * from './prefetch-template.ts';
