// The data model shared by readers, templates and the pipeline.

/** A field of an example: whatever the source file holds (strings, numbers, booleans, lists, records). */
export type FieldValue = string | number | boolean | null | FieldValue[] | { [key: string]: FieldValue };

/**
 * One labelled (or unlabelled) example. `fields` use the Hugging Face `datasets` field names of the task
 * (what P3 templates refer to: premise, hypothesis, choice1, ...), whatever file format it came from.
 */
export interface Example {
  /** Stable id from the source (idx, uid, story id, RAFT ID), as a string. */
  id: string;
  fields: Record<string, FieldValue>;
  /** Index of the gold answer choice; -1 when the example is unlabelled (RAFT test sets, user inputs). */
  label: number;
}

/** Where the data comes from: `--data-dir`, else TFEW_DATA_DIR, else ../shared/data next to the package. */
export interface DataOptions {
  dataDir?: string;
}
