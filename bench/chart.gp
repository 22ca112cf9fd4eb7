# Bars: each target's result relative to HAProxy (> 1 = better than HAProxy), per scenario.
# Called by bench/run with -e "datafile='...'; outfile='...'".
set terminal pngcairo size 1200,560 font ",10"
set output outfile
set title "fulcrum bench: result relative to HAProxy (higher is better; 1 = HAProxy)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set yrange [0:*]
set ylabel "x HAProxy"
set xtics rotate by -30 scale 0
set key top right
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2 lc rgb "#444444" front
plot datafile using 2:xtic(1) title "direct" lc rgb "#9e9e9e", \
     '' using 3 title "fulcrum" lc rgb "#1f77b4", \
     '' using 4 title "nginx" lc rgb "#2ca02c"
