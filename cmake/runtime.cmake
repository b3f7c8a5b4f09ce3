# The pure C++ runtime: safetensors/checkpoint loader, tokenizer, Llama-family
# decoder and the qdec_infer program, plus its tests and fuzz target.
# Included at the end of the top-level CMakeLists.txt (needs Torch, qdec_ops,
# qdec_link_ops and _with_cuda from there).
#
# Targets:
#   qdec_runtime_core          torch-free: JSON limits, safetensors header, tokenizer,
#                              qdec tune configs
#   qdec_runtime               + libtorch: mapped tensors, checkpoint, model, sampler
#   qdec_infer                 the program (README: "Pure C++ inference")
#   qdec_runtime_tests         Catch2 tests (ctest name qdec_runtime_tests)
#   check_runtime_sanitize     configures <build>/sanitize with QDEC_SANITIZE=ON,
#                              builds and runs qdec_runtime_tests under ASan+UBSan
#   fuzz_safetensors_header    libFuzzer target: built in-tree when the compiler
#                              supports -fsanitize=fuzzer; otherwise, if clang++ is
#                              installed, a custom target builds it with clang in
#                              <build>/fuzz (tests/fuzz/CMakeLists.txt)
#   fuzz_safetensors_header_replay  the same target body with a plain main() that
#                              replays files/directories; built with any compiler and
#                              run by ctest over tests/fuzz/corpus
find_package(nlohmann_json 3 REQUIRED)

set(_rt "${CMAKE_CURRENT_LIST_DIR}/../csrc/runtime")
get_filename_component(_rt "${_rt}" ABSOLUTE)
get_filename_component(_qdec_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

add_library(qdec_runtime_core STATIC
  ${_rt}/json_util.cpp ${_rt}/safetensors_header.cpp ${_rt}/tokenizer.cpp ${_rt}/tune_config.cpp)
target_include_directories(qdec_runtime_core PUBLIC "${_qdec_root}/csrc")
target_link_libraries(qdec_runtime_core PUBLIC nlohmann_json::nlohmann_json)
set_target_properties(qdec_runtime_core PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_compile_options(qdec_runtime_core PRIVATE -Wall -Wextra)

add_library(qdec_runtime STATIC
  ${_rt}/safetensors.cpp ${_rt}/checkpoint.cpp ${_rt}/foreign_checkpoint.cpp ${_rt}/model.cpp ${_rt}/decode_cpu.cpp
  ${_rt}/sampling.cpp)
target_link_libraries(qdec_runtime PUBLIC qdec_runtime_core qdec_ops ${TORCH_LIBRARIES})
set_target_properties(qdec_runtime PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_compile_options(qdec_runtime PRIVATE -Wall -Wextra -Wno-unused-parameter)
if(_with_cuda)
  target_compile_definitions(qdec_runtime PUBLIC QDEC_RUNTIME_WITH_CUDA=1)
endif()

add_executable(qdec_infer ${_rt}/qdec_infer.cpp)
target_link_libraries(qdec_infer PRIVATE qdec_runtime)
target_compile_options(qdec_infer PRIVATE -Wall -Wextra -Wno-unused-parameter)
qdec_link_ops(qdec_infer)

# ---- tests -------------------------------------------------------------------
if(QDEC_BUILD_TESTS)
  file(GLOB _rt_tests CONFIGURE_DEPENDS "${_qdec_root}/tests/cpp/test_runtime_*.cpp")
  add_executable(qdec_runtime_tests
    "${_qdec_root}/tests/cpp/main.cpp" "${_qdec_root}/tests/cpp/test_loader.cpp" ${_rt_tests})
  target_link_libraries(qdec_runtime_tests PRIVATE qdec_runtime Catch2::Catch2)
  target_compile_definitions(qdec_runtime_tests PRIVATE QDEC_SOURCE_DIR="${_qdec_root}")
  qdec_link_ops(qdec_runtime_tests)
  enable_testing()
  add_test(NAME qdec_runtime_tests COMMAND qdec_runtime_tests)
  if(QDEC_SANITIZE)
    set_tests_properties(qdec_runtime_tests PROPERTIES ENVIRONMENT
      "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
  else()
    set(QDEC_SANITIZE_JOBS 2 CACHE STRING "parallel jobs of the check_runtime_sanitize build")
    add_custom_target(check_runtime_sanitize
      COMMAND ${CMAKE_COMMAND} -S "${_qdec_root}" -B "${CMAKE_BINARY_DIR}/sanitize" -G "${CMAKE_GENERATOR}"
              -DQDEC_SANITIZE=ON -DQDEC_USE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
              "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}" "-DTorch_DIR=${Torch_DIR}"
      COMMAND ${CMAKE_COMMAND} --build "${CMAKE_BINARY_DIR}/sanitize" --target qdec_runtime_tests
              --parallel ${QDEC_SANITIZE_JOBS}
      COMMAND ${CMAKE_COMMAND} -E env "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
              "${CMAKE_BINARY_DIR}/sanitize/qdec_runtime_tests"
      COMMENT "qdec_runtime_tests under AddressSanitizer + UndefinedBehaviorSanitizer"
      USES_TERMINAL VERBATIM)
  endif()

  # Replay driver: the fuzz target's body with an ordinary main(), any compiler.
  add_executable(fuzz_safetensors_header_replay
    "${_qdec_root}/tests/fuzz/fuzz_safetensors_header.cpp"
    "${_qdec_root}/tests/fuzz/replay_main.cpp")
  target_link_libraries(fuzz_safetensors_header_replay PRIVATE qdec_runtime_core)
  add_test(NAME fuzz_safetensors_header_corpus
           COMMAND fuzz_safetensors_header_replay "${_qdec_root}/tests/fuzz/corpus/safetensors_header")
endif()

# ---- libFuzzer -------------------------------------------------------------------
include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=fuzzer")
set(CMAKE_REQUIRED_LINK_OPTIONS "-fsanitize=fuzzer")
check_cxx_source_compiles(
  "#include <cstddef>\n#include <cstdint>\nextern \"C\" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }"
  QDEC_COMPILER_HAS_LIBFUZZER)
unset(CMAKE_REQUIRED_FLAGS)
unset(CMAKE_REQUIRED_LINK_OPTIONS)
if(QDEC_COMPILER_HAS_LIBFUZZER)
  add_executable(fuzz_safetensors_header
    "${_qdec_root}/tests/fuzz/fuzz_safetensors_header.cpp"
    ${_rt}/json_util.cpp ${_rt}/safetensors_header.cpp ${_rt}/tokenizer.cpp)
  target_include_directories(fuzz_safetensors_header PRIVATE "${_qdec_root}/csrc")
  target_link_libraries(fuzz_safetensors_header PRIVATE nlohmann_json::nlohmann_json)
  target_compile_options(fuzz_safetensors_header PRIVATE -fsanitize=fuzzer,address,undefined -g -O1)
  target_link_options(fuzz_safetensors_header PRIVATE -fsanitize=fuzzer,address,undefined)
  message(STATUS "qdec: libFuzzer target fuzz_safetensors_header enabled")
else()
  find_program(QDEC_CLANGXX NAMES clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14)
  if(QDEC_CLANGXX)
    add_custom_target(fuzz_safetensors_header
      COMMAND ${CMAKE_COMMAND} -S "${_qdec_root}/tests/fuzz" -B "${CMAKE_BINARY_DIR}/fuzz" -G "${CMAKE_GENERATOR}"
              "-DCMAKE_CXX_COMPILER=${QDEC_CLANGXX}"
      COMMAND ${CMAKE_COMMAND} --build "${CMAKE_BINARY_DIR}/fuzz" --parallel 2
      COMMENT "libFuzzer target with ${QDEC_CLANGXX}: ${CMAKE_BINARY_DIR}/fuzz/fuzz_safetensors_header"
      USES_TERMINAL VERBATIM)
    message(STATUS "qdec: libFuzzer target fuzz_safetensors_header via ${QDEC_CLANGXX} (build it explicitly)")
  else()
    message(STATUS "qdec: no compiler with -fsanitize=fuzzer; fuzz_safetensors_header skipped "
                   "(the replay driver fuzz_safetensors_header_replay is still built)")
  endif()
endif()
