# CMake package config of attnrt's C ABI, installed to <prefix>/lib/cmake/attnrt/ by
# ffi/install.sh. Use:
#   find_package(attnrt REQUIRED)            # with CMAKE_PREFIX_PATH=<prefix>
#   target_link_libraries(app PRIVATE attnrt::attnrt)
# attnrt::attnrt is the static library; attnrt::shared the shared one, when installed.
get_filename_component(_attnrt_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET attnrt::attnrt)
  add_library(attnrt::attnrt STATIC IMPORTED)
  set_target_properties(attnrt::attnrt PROPERTIES
    IMPORTED_LOCATION "${_attnrt_prefix}/lib/libattnrt_ffi.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_attnrt_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m")
endif()

if(NOT TARGET attnrt::shared AND EXISTS "${_attnrt_prefix}/lib/libattnrt_ffi.so")
  add_library(attnrt::shared SHARED IMPORTED)
  set_target_properties(attnrt::shared PROPERTIES
    IMPORTED_LOCATION "${_attnrt_prefix}/lib/libattnrt_ffi.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_attnrt_prefix}/include")
endif()

unset(_attnrt_prefix)
set(attnrt_FOUND TRUE)
