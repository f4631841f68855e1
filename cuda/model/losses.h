// What both backends' T-Few losses share (cpu/loss.cc, kernels/loss.cu; tfew-spec.md §1 "Losses").
#pragma once

namespace tfew {

// T-Few's "+ 0.01" inside the unlikelihood log, log(1 - p + 0.01) (in its code, absent from the paper).
constexpr double kUnlikelihoodEps = 0.01;

}  // namespace tfew
